"""FGSM: the Fast Gradient Sign Method (Goodfellow et al., ICLR 2015); documented on
:class:`FGSM`.
"""

from __future__ import annotations

import torch

from ..bench.core import Threat, margin
from .base import Attack, register_attack, resolve_loss, steepest_step

__all__ = ["FGSM"]


@register_attack("fgsm")
class FGSM(Attack):
    """FGSM: the Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, "Explaining and
    Harnessing Adversarial Examples", ICLR 2015).

    Threat model: white-box (one input gradient), ``Linf`` or ``L2`` ball of radius ``eps``
    intersected with [0, 1]; untargeted, or targeted when ``targets`` is given to the call.

    One step of size eps along the steepest-ascent direction of the loss: ``sign(grad)`` for
    Linf, the normalised gradient (FGM) for L2. With ``random_start`` the step starts from a
    uniform point of the ball (R+FGSM, Tramèr et al., ICLR 2018; Wong, Rice & Kolter, ICLR 2020).
    The better of the start and the step (lower margin) is returned per sample.

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        random_start: start from a random point of the ball (default False).
        loss: ``"ce"`` (default), ``"margin"`` or ``"dlr"``.

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N, ``targets`` int64 N or None ->
    :class:`~unmask.bench.core.AttackResult` (one forward and one backward pass per sample,
    plus the verdict's forward pass).

    Usage: ``FGSM(Threat("linf", 0.1))(model, x, y, generator=g).x_adv``
    """

    name = "fgsm"

    def __init__(self, threat: Threat, random_start: bool = False, loss: str = "ce") -> None:
        super().__init__(threat)
        self.random_start = bool(random_start)
        self.loss, self._loss = resolve_loss(loss)

    def config(self):
        return {**super().config(), "random_start": self.random_start, "loss": self.loss.value}

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        xa, ya = x[idx], y[idx]
        ta = targets[idx] if targets is not None else None
        start = self.threat.random_point(xa, generator) if self.random_start else xa
        _, logits, grad = oracle(model, start, ya, ta, self._loss, generator)
        tracker.cost(idx, oracle.samples, oracle.samples)
        tracker.update(idx, start, margin(logits, ya, ta))
        x_adv = self.threat.project(steepest_step(self.threat, start, grad, self.threat.eps), xa)
        with torch.no_grad():
            tracker.update(idx, x_adv, margin(oracle.logits(model, x_adv, generator), ya, ta))
        tracker.cost(idx, oracle.samples)
