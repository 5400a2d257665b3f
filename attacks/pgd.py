"""PGD: Projected Gradient Descent (Madry et al., ICLR 2018); documented on :class:`PGD`.
"""

from __future__ import annotations

import torch

from ..bench.core import Threat, margin
from .base import Attack, compaction_points, register_attack, resolve_loss, steepest_step

__all__ = ["PGD"]


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")
    return value


@register_attack("pgd")
class PGD(Attack):
    """PGD: Projected Gradient Descent (Madry, Makelov, Schmidt, Tsipras & Vladu, "Towards Deep
    Learning Models Resistant to Adversarial Attacks", ICLR 2018).

    Threat model: white-box (input gradients), ``Linf`` or ``L2`` ball of radius ``eps``
    intersected with [0, 1]; untargeted, or targeted when ``targets`` is given to the call.

    ``steps`` steepest-ascent steps of size ``step_size`` on the loss (``sign(grad)`` for Linf,
    ``grad / ||grad||_2`` for L2), each followed by the projection onto the ball, from a uniform
    random start. With ``restarts`` > 1 the samples still robust are attacked again from a fresh
    start; the best iterate per sample (lowest margin) is kept across steps and restarts.

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        steps: iterations per restart (default 40).
        step_size: default None, meaning ``2.5 * eps / steps`` (Madry et al.'s rule of thumb).
        restarts: random restarts (default 1).
        loss: ``"ce"`` (default), ``"margin"`` (Carlini & Wagner logit margin) or ``"dlr"``
            (Croce & Hein 2020).
        random_start: start from a uniform point of the ball (default True).
        loss_fn: default None; a callable ``(logits, y, targets) -> per-sample loss`` to ascend
            instead of the named ``loss`` (e.g. a wrapper that records the loss trajectory, as the
            masking diagnosis does; it must not read tensors back to the host). ``loss`` is
            still recorded in ``config()`` and should name the loss the callable computes.

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N, ``targets`` int64 N or None ->
    :class:`~unmask.bench.core.AttackResult` (``x_adv`` N x C x H x W; ``success``, ``margin``,
    ``forwards``, ``backwards`` N).

    Usage: ``PGD(Threat("linf", 0.3), steps=40)(model, x, y, generator=g)``
    """

    name = "pgd"

    def __init__(self, threat: Threat, steps: int = 40, step_size: float | None = None,
                 restarts: int = 1, loss: str = "ce", random_start: bool = True,
                 loss_fn=None) -> None:
        super().__init__(threat)
        self.steps = _positive_int(steps, "steps")
        self.restarts = _positive_int(restarts, "restarts")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        self.step_size = float(step_size) if step_size is not None else 2.5 * threat.eps / steps
        self.loss, self._loss = resolve_loss(loss)
        if loss_fn is not None:
            if not callable(loss_fn):
                raise TypeError(f"loss_fn must be a callable (logits, y, targets) -> loss, "
                                f"got {type(loss_fn).__name__}")
            self._loss = loss_fn
        self.random_start = bool(random_start)

    def config(self):
        return {**super().config(), "steps": self.steps, "step_size": self.step_size,
                "restarts": self.restarts, "loss": self.loss.value,
                "random_start": self.random_start}

    def _attack(self, model, x, y, targets, generator, tracker, robust, oracle) -> None:
        points = compaction_points(self.steps)
        for _, idx in tracker.runs(robust, range(self.restarts)):
            xa, ya = x[idx], y[idx]
            ta = targets[idx] if targets is not None else None
            x_cur = self.threat.random_point(xa, generator) if self.random_start else xa.clone()
            for step in range(1, self.steps + 1):
                _, logits, grad = oracle(model, x_cur, ya, ta, self._loss, generator)
                tracker.cost(idx, oracle.samples, oracle.samples)
                tracker.update(idx, x_cur, margin(logits, ya, ta))
                x_cur = self.threat.project(
                    steepest_step(self.threat, x_cur, grad, self.step_size), xa)
                if step in points and step < self.steps:
                    idx, (xa, ya, ta, x_cur) = tracker.shrink(idx, xa, ya, ta, x_cur)
                    if not idx.numel():
                        return
            with torch.no_grad():
                tracker.update(idx, x_cur, margin(oracle.logits(model, x_cur, generator), ya, ta))
            tracker.cost(idx, oracle.samples)
