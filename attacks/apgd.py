"""APGD and APGD-T: Auto-PGD (Croce & Hein, ICML 2020); documented on :class:`APGD` and
:class:`APGDT`.
"""

from __future__ import annotations

import itertools

import torch

from ..bench.core import Threat, margin
from .base import Attack, compaction_points, register_attack, resolve_loss, steepest_step
from .losses import dlr_loss
from .pgd import _positive_int

__all__ = ["APGD", "APGDT", "checkpoint_intervals"]

# Croce & Hein 2020, section 3.2: p_1 = 0.22, intervals shrink by 0.03 down to 0.06.
FIRST_INTERVAL, INTERVAL_DECREASE, MIN_INTERVAL = 0.22, 0.03, 0.06


def checkpoint_intervals(steps: int) -> list[int]:
    """Lengths of the intervals between step-size checkpoints for a run of ``steps``."""
    k = max(int(FIRST_INTERVAL * steps), 1)
    decrease = max(int(INTERVAL_DECREASE * steps), 1)
    minimum = max(int(MIN_INTERVAL * steps), 1)
    out, total = [], 0
    while total + k <= steps:
        out.append(k)
        total += k
        k = max(k - decrease, minimum)
    return out


def _apgd(attack, model, x, y, loss_targets, success_targets, generator, tracker, idx,
          oracle, loss) -> None:
    """One APGD run over samples ``idx``; the loss may be targeted while success is not."""
    threat, steps = attack.threat, attack.steps
    view = (-1,) + (1,) * (x.dim() - 1)
    checks, cum = [], 0
    for k in checkpoint_intervals(steps):
        cum += k
        checks.append((cum, k))
    check_at = dict(checks)
    # Early exit at the checkpoints and at the shared geometric points: every state tensor is
    # per sample, so the active set can shrink at any step.
    compact_at = set(check_at) | compaction_points(steps)

    xa, ya = x[idx], y[idx]
    lt = loss_targets[idx] if loss_targets is not None else None
    st = success_targets[idx] if success_targets is not None else None
    x_cur = threat.random_point(xa, generator)
    values, logits, grad = oracle(model, x_cur, ya, lt, loss, generator)
    tracker.cost(idx, oracle.samples, oracle.samples)
    tracker.update(idx, x_cur, margin(logits, ya, st))

    step = torch.full((xa.shape[0],), 2.0 * threat.eps, device=x.device, dtype=x.dtype)
    loss_best, x_best_loss, grad_best = values.clone(), x_cur.clone(), grad.clone()
    loss_prev = values.clone()
    increases = torch.zeros_like(values)
    reduced_last = torch.zeros_like(values, dtype=torch.bool)
    loss_best_last_check = loss_best.clone()
    x_prev = x_cur.clone()

    for i in range(1, steps + 1):
        a = 1.0 if i == 1 else attack.momentum
        with torch.no_grad():
            z = threat.project(steepest_step(threat, x_cur, grad, step.view(view)), xa)
            x_next = threat.project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), xa)
        x_prev, x_cur = x_cur, x_next
        values, logits, grad = oracle(model, x_cur, ya, lt, loss, generator)
        tracker.cost(idx, oracle.samples, oracle.samples)
        tracker.update(idx, x_cur, margin(logits, ya, st))
        increases += (values > loss_prev).to(values.dtype)
        loss_prev = values
        better = values > loss_best
        loss_best = torch.where(better, values, loss_best)
        x_best_loss = torch.where(better.view(view), x_cur, x_best_loss)
        grad_best = torch.where(better.view(view), grad, grad_best)

        if i in check_at:
            k = check_at[i]
            stalled = increases <= attack.rho * k
            no_progress = ~reduced_last & (loss_best_last_check >= loss_best)
            reduce = stalled | no_progress
            step = torch.where(reduce, step / 2, step)
            x_cur = torch.where(reduce.view(view), x_best_loss, x_cur)
            grad = torch.where(reduce.view(view), grad_best, grad)
            reduced_last, loss_best_last_check = reduce, loss_best.clone()
            increases = torch.zeros_like(increases)
        if i in compact_at and i < steps:
            idx, (xa, ya, lt, st, x_cur, x_prev, grad, step, loss_best, x_best_loss, grad_best,
                  loss_prev, increases, reduced_last, loss_best_last_check) = tracker.shrink(
                idx, xa, ya, lt, st, x_cur, x_prev, grad, step, loss_best, x_best_loss,
                grad_best, loss_prev, increases, reduced_last, loss_best_last_check)
            if not idx.numel():
                return


@register_attack("apgd")
class APGD(Attack):
    """APGD: Auto-PGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an
    ensemble of diverse parameter-free attacks", ICML 2020).

    Threat model: white-box (input gradients), ``Linf`` or ``L2`` ball of radius ``eps``
    intersected with [0, 1]; untargeted, or targeted when ``targets`` is given to the call.

    PGD with momentum (alpha = ``momentum``) and a per-sample step size that starts at 2 * eps
    and is halved at checkpoints when the attack stalls: at checkpoint w_j the step is halved (and
    the iterate reset to the best point found) when (1) the loss grew in at most ``rho`` of the
    steps since the previous checkpoint, or (2) the step was not halved at the previous
    checkpoint and the best loss has not improved since. Checkpoint intervals start at 0.22 N and
    shrink by 0.03 N down to 0.06 N (:func:`checkpoint_intervals`). Early exit happens at the
    checkpoints and at the shared compaction points.

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        steps: iterations (default 100), plus one initial gradient.
        loss: ``"ce"`` (default) or ``"dlr"`` (``"margin"`` also works); ``"dlr"`` needs at
            least 3 classes (4 when targeted).
        restarts: random restarts on the samples still robust (default 1).
        rho: the checkpoint success-rate threshold, in (0, 1] (default 0.75).
        momentum: alpha, in [0, 1] (default 0.75).

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N, ``targets`` int64 N or None ->
    :class:`~unmask.bench.core.AttackResult`.

    Usage: ``APGD(Threat("linf", 8/255), loss="dlr")(model, x, y, generator=g)``
    """

    name = "apgd"

    def __init__(self, threat: Threat, steps: int = 100, loss: str = "ce", restarts: int = 1,
                 rho: float = 0.75, momentum: float = 0.75) -> None:
        super().__init__(threat)
        self.steps = _positive_int(steps, "steps")
        self.restarts = _positive_int(restarts, "restarts")
        self.loss, self._loss = resolve_loss(loss)
        if not 0 < rho <= 1 or not 0 <= momentum <= 1:
            raise ValueError(f"rho must be in (0, 1] and momentum in [0, 1], got {rho}, {momentum}")
        self.rho, self.momentum = float(rho), float(momentum)

    @property
    def label(self) -> str:
        return f"apgd-{self.loss.value}"

    def config(self):
        return {**super().config(), "steps": self.steps, "loss": self.loss.value,
                "restarts": self.restarts, "rho": self.rho, "momentum": self.momentum}

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        for _, active in tracker.runs(idx, range(self.restarts)):
            _apgd(self, model, x, y, targets, targets, generator, tracker, active, oracle,
                  self._loss)


@register_attack("apgd-t")
class APGDT(APGD):
    """APGD-T: targeted APGD over the top classes (Croce & Hein, ICML 2020, the targeted
    member of AutoAttack's standard suite).

    Threat model: white-box, ``Linf`` or ``L2`` ball of radius ``eps`` intersected with
    [0, 1]; untargeted success criterion (the attack picks its own targets, so ``targets``
    must not be given to the call).

    Runs :class:`APGD` with the targeted DLR loss against each of the ``n_targets`` classes
    with the highest clean logits after the predicted one, ``restarts`` times each, always on
    the samples still robust; the best iterate per sample is kept across all runs. Needs at
    least 4 classes.

    Args:
        threat: ``Threat("linf" | "l2", eps)``.
        steps: iterations per run (default 100).
        n_targets: target classes tried, at most K - 1 (default 9).
        restarts: runs per target class (default 1).
        rho, momentum: as :class:`APGD` (defaults 0.75, 0.75).

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N ->
    :class:`~unmask.bench.core.AttackResult`.

    Usage: ``APGDT(Threat("linf", 8/255), n_targets=9)(model, x, y, generator=g)``
    """

    name = "apgd-t"

    def __init__(self, threat: Threat, steps: int = 100, n_targets: int = 9, restarts: int = 1,
                 rho: float = 0.75, momentum: float = 0.75) -> None:
        super().__init__(threat, steps=steps, loss="dlr", restarts=restarts, rho=rho,
                         momentum=momentum)
        self.n_targets = _positive_int(n_targets, "n_targets")

    @property
    def label(self) -> str:
        return "apgd-t"

    def config(self):
        cfg = {**super().config(), "n_targets": self.n_targets}
        cfg["loss"] = "dlr-targeted"
        return cfg

    def _check_classes(self, num_classes: int, targeted: bool) -> None:
        if targeted:
            raise ValueError("APGDT chooses its own targets; call APGD with targets instead")
        if num_classes < 4:
            raise ValueError(f"APGDT's targeted DLR loss needs at least 4 classes, the model "
                             f"has {num_classes}; use APGD")

    def _target_order(self, model, x, y, generator, tracker, idx, oracle) -> torch.Tensor:
        """Per sample of ``idx``, the classes in the order they are tried (column 0, the true
        class, is skipped): here by clean logit, highest first, as AutoAttack does."""
        with torch.no_grad():
            order = oracle.logits(model, x[idx], generator).argsort(dim=1, descending=True)
        tracker.cost(idx, oracle.samples)
        return order

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        order = self._target_order(model, x, y, generator, tracker, idx, oracle)
        all_targets = torch.zeros(x.shape[0], order.shape[1], dtype=torch.long, device=x.device)
        all_targets[idx] = order
        n_targets = min(self.n_targets, order.shape[1] - 1)
        runs = itertools.product(range(1, n_targets + 1), range(self.restarts))
        for (rank, _), active in tracker.runs(idx, runs):
            _apgd(self, model, x, y, all_targets[:, rank], None, generator, tracker, active,
                  oracle, dlr_loss)
