"""The attack base class and the bookkeeping every attack shares.

An attack is configured once and applied to any model::

    result = PGD(Threat("linf", 0.3), steps=40)(model, x, y, generator=g)

:class:`Attack.__call__` validates the inputs, switches the model to eval mode with frozen
parameters (restoring both afterwards, also on error), runs the clean forward pass, and hands
the samples the model still classifies correctly to the subclass's ``_attack``. Subclasses hold
only the algorithm; they keep per-sample state in a :class:`Tracker`, which records the best
iterate, its margin and the cost per sample.

Early exit: a subclass shrinks its active set to the samples still robust at the fixed points
given by :func:`compaction_points`. Only there does it read a tensor on the host; between
them the step loop runs without synchronisation, and samples already broken are carried at
most until the next point. The points do not depend on the data or the device, so the same
seed gives the same result on any device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..bench.core import (
    AttackResult,
    Norm,
    Threat,
    check_inputs,
    check_logits,
    make_generator,
    margin,
    model_mode,
    parse_enum,
    warn_if_train_mode,
)
from ..bench.core.registry import Registry
from .losses import Loss, loss_fn

__all__ = ["Attack", "ATTACKS", "register_attack", "Tracker", "compaction_points",
           "GradientOracle", "WrapperAttack", "check_targets", "steepest_step"]

T = TypeVar("T")

ATTACKS: Registry[type] = Registry("attack")
register_attack = ATTACKS.register

# Early exit happens at ceil(GROWTH^k) and every n / REGULAR_POINTS steps: a sample broken at
# step s is carried at most to about GROWTH * s (early on) or s + n / REGULAR_POINTS steps,
# and a run of n steps reads the host O(log n + REGULAR_POINTS) times.
GROWTH = 1.5
REGULAR_POINTS = 20


def compaction_points(n: int) -> set[int]:
    """Steps (1-based, after which) an attack drops broken samples from its active set."""
    points, k = set(), 1.0
    while k <= n:
        points.add(math.ceil(k))
        k *= GROWTH
    every = max(1, n // REGULAR_POINTS)
    points.update(range(every, n + 1, every))
    return points


def check_targets(targets: Tensor | None, y: Tensor, num_classes: int) -> Tensor | None:
    """Validate target labels of a targeted attack: int, one per sample, in range, != y."""
    if targets is None:
        return None
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError("targets must be an int64 tensor of class indices")
    if targets.shape != y.shape:
        raise ValueError(f"targets must have shape {tuple(y.shape)} (one per sample), "
                         f"got {tuple(targets.shape)}")
    targets = targets.to(y.device).long()
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise ValueError(f"targets must be class indices in [0, {num_classes - 1}]")
    same = (targets == y).nonzero().flatten()
    if same.numel():
        raise ValueError(f"targets equal the true labels for samples {same[:10].tolist()}: "
                         "a targeted attack needs a target different from the true class")
    return targets


class Tracker:
    """Per-sample state of one attack run over ``N`` samples.

    ``x_best``/``margin`` hold the best iterate so far and its margin (negative = broken);
    ``forwards``/``backwards`` the cost spent on each sample. Updates take the indices of the
    active samples and never read the host.
    """

    def __init__(self, x: Tensor, clean_margin: Tensor) -> None:
        self.x = x
        self.x_best = x.clone()
        self.margin = clean_margin.clone()
        n = x.shape[0]
        self.forwards = torch.ones(n, dtype=torch.long, device=x.device)  # the clean pass
        self.backwards = torch.zeros(n, dtype=torch.long, device=x.device)
        self.extra: dict[str, Any] = {}  # run facts for the result's config (e.g. surrogate cost)

    def update(self, idx: Tensor, x_cand: Tensor, m_cand: Tensor) -> None:
        """Keep ``x_cand`` for the samples ``idx`` where its margin is lower than the best."""
        old = self.margin[idx]
        better = m_cand < old
        self.margin[idx] = torch.where(better, m_cand, old)
        self.x_best[idx] = torch.where(better.view(-1, *[1] * (x_cand.dim() - 1)), x_cand,
                                       self.x_best[idx])

    def cost(self, idx: Tensor, forwards: int = 1, backwards: int = 0) -> None:
        """Add ``forwards`` forward and ``backwards`` backward passes to each sample of ``idx``."""
        if forwards:
            self.forwards[idx] += forwards
        if backwards:
            self.backwards[idx] += backwards

    def robust(self, idx: Tensor) -> Tensor:
        """Boolean mask over ``idx``: not broken yet."""
        return self.margin[idx] >= 0

    def runs(self, idx: Tensor, runs: Iterable[T]) -> Iterator[tuple[T, Tensor]]:
        """Restarts over the samples still robust: for each item of ``runs`` (a restart
        number, or a (target rank, restart) pair), yield it with the samples of ``idx`` not
        broken by the runs before; stop as soon as none is left. The first run takes ``idx``
        as given (:meth:`Attack.run` passes the samples robust after the clean pass)."""
        for i, run in enumerate(runs):
            if i:
                idx = idx[self.robust(idx)]
                if not idx.numel():
                    return
            yield run, idx

    def shrink(self, idx: Tensor, *state: Tensor | None) -> tuple[Tensor, tuple]:
        """Early exit: restrict the active samples ``idx`` and each per-sample ``state`` tensor
        (rows aligned with ``idx``; None passes through) to the samples still robust.

        Returns ``(idx, state)``, unchanged when nothing was broken; an empty ``idx`` means
        every sample is broken and the run can stop. Reads the host once, so a step loop calls
        it only at the :func:`compaction_points`.
        """
        keep = self.robust(idx)
        if bool(keep.all()):  # host read: the caller is at a compaction point
            return idx, state
        return idx[keep], tuple(None if t is None else t[keep] for t in state)

    def result(self, name: str, config: dict[str, Any]) -> AttackResult:
        """The run as an :class:`AttackResult`: best iterates, success (margin < 0), margins and
        costs.
        """
        return AttackResult(x_adv=self.x_best, success=self.margin < 0, margin=self.margin,
                            forwards=self.forwards, backwards=self.backwards, name=name,
                            config={**config, **self.extra})


@dataclass(frozen=True)
class GradientOracle:
    """How a gradient attack queries the model: plain, or averaged over random transforms
    (EOT). ``transform(x, generator) -> x'`` must be differentiable; ``samples`` copies of
    the batch are transformed and stacked along the batch dimension in one forward pass."""

    samples: int = 1
    transform: Any = None

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, targets: Tensor | None,
                 loss: Any, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """Returns (per-sample loss, logits for the margin, input gradient of the loss)."""
        x = x.detach().requires_grad_(True)
        if self.samples == 1 and self.transform is None:
            logits = model(x)
            values = loss(logits, y, targets)
        else:
            k, n = self.samples, x.shape[0]
            xs = x.repeat(k, *[1] * (x.dim() - 1))
            if self.transform is not None:
                xs = self.transform(xs, generator)
            logits_all = model(xs)
            rep_t = targets.repeat(k) if targets is not None else None
            values = loss(logits_all, y.repeat(k), rep_t).view(k, n).mean(0)
            logits = logits_all.view(k, n, -1).mean(0)
        (grad,) = torch.autograd.grad(values.sum(), x)
        return values.detach(), logits.detach(), grad

    @torch.no_grad()
    def logits(self, model: nn.Module, x: Tensor, generator: torch.Generator | None) -> Tensor:
        """Logits at ``x``, averaged over the oracle's samples like the gradient."""
        if self.samples == 1 and self.transform is None:
            return model(x)
        k, n = self.samples, x.shape[0]
        xs = x.repeat(k, *[1] * (x.dim() - 1))
        if self.transform is not None:
            xs = self.transform(xs, generator)
        return model(xs).view(k, n, -1).mean(0)


def steepest_step(threat: Threat, x: Tensor, grad: Tensor, step_size: float | Tensor) -> Tensor:
    """One steepest-ascent step of the threat's norm: ``sign(grad)`` for Linf, ``grad / ||grad||``
    for L2 (samples with a zero gradient do not move)."""
    if threat.norm is Norm.LINF:
        return x + step_size * grad.sign()
    norms = grad.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
    return x + step_size * grad / norms


PLAIN = GradientOracle()


class Attack:
    """Base class. Subclasses set ``name`` and implement ``_attack``.

    ``_attack(model, x, y, targets, generator, tracker, idx, oracle)`` works on the samples
    ``idx`` (still robust after the clean pass) and records everything in ``tracker``.
    """

    name = "attack"
    gradient_free = False

    def __init__(self, threat: Threat) -> None:
        if not isinstance(threat, Threat):
            raise TypeError(f"threat must be a Threat(norm, eps), got {type(threat).__name__}")
        self.threat = threat

    @property
    def label(self) -> str:
        """Short name used in tables and ``broken_by`` (e.g. ``apgd-ce``)."""
        return self.name

    def config(self) -> dict[str, Any]:
        """The attack's settings (for provenance); subclasses add theirs."""
        return {"attack": self.name, **self.threat.to_dict()}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "attack")
        return f"{type(self).__name__}({args})"

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor, *, targets: Tensor | None = None,
                 generator: torch.Generator | int | None = None) -> AttackResult:
        """Attack ``model`` on ``x`` (N x C x H x W in [0, 1]) with labels ``y`` (int64 N), targeted
        at ``targets`` (int64 N) when given; randomness from ``generator`` (a torch.Generator or a
        seed; None means seed 0). Returns an :class:`AttackResult`.
        """
        return self.run(model, x, y, targets=targets, generator=generator)

    def run(self, model: nn.Module, x: Tensor, y: Tensor, *, targets: Tensor | None = None,
            generator: torch.Generator | int | None = None,
            oracle: GradientOracle = PLAIN) -> AttackResult:
        """Like :meth:`__call__`, with the gradient ``oracle`` exposed (EOT passes one that averages
        over random draws). Validates ``x`` (N x C x H x W in [0, 1]), ``y`` (int64 N) and
        ``targets``; runs the model in eval mode with frozen parameters (both restored); attacks
        only the samples the model still classifies correctly; returns an :class:`AttackResult`
        whose ``x_adv`` is projected onto the threat ball once more. ``generator`` is a
        torch.Generator or a seed (None means seed 0).
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        x, y = check_inputs(x, y, model=model)
        generator = make_generator(0 if generator is None else generator)
        warn_if_train_mode(model, stacklevel=4)
        with model_mode(model):
            with torch.no_grad():
                # Under EOT the clean verdict is in expectation too: one lucky draw of a
                # randomised model must not exempt a sample from the attack.
                logits = check_logits(oracle.logits(model, x, generator), x.shape[0],
                                      model=model, labels=y)
            num_classes = logits.shape[1]
            targets = check_targets(targets, y, num_classes)
            self._check_classes(num_classes, targets is not None)
            tracker = Tracker(x.detach(), margin(logits.float(), y, targets))
            tracker.forwards.fill_(oracle.samples)
            idx = tracker.robust(torch.arange(x.shape[0], device=x.device)).nonzero().flatten()
            if idx.numel() and self.threat.eps > 0:
                self._attack(model, x.detach(), y, targets, generator, tracker, idx, oracle)
        # The one shared projection, once more: a guarantee, whatever the algorithm did.
        tracker.x_best = self.threat.project(tracker.x_best, x.detach())
        return tracker.result(self.name, self.config())

    def _check_classes(self, num_classes: int, targeted: bool) -> None:
        loss = getattr(self, "loss", None)
        if loss is Loss.DLR and num_classes < (4 if targeted else 3):
            raise ValueError(f"the dlr loss needs at least {4 if targeted else 3} classes, "
                             f"the model has {num_classes}; use loss='ce' or 'margin'")

    def _attack(self, model, x, y, targets, generator, tracker, idx, oracle) -> None:
        raise NotImplementedError  # pragma: no cover - abstract


class WrapperAttack(Attack):
    """Base of the attacks that wrap a gradient attack (:class:`~unmask.attacks.EOT`,
    :class:`~unmask.attacks.BPDA`): checks that ``attack`` is a gradient attack, takes its
    threat model, and labels the result ``<name>-<wrapped label>`` (e.g. ``eot-apgd-ce``).
    The wrapped attack is never mutated.

    Args:
        attack: the gradient :class:`Attack` to wrap (not gradient-free, e.g. not Square).
    """

    def __init__(self, attack: Attack) -> None:
        if not isinstance(attack, Attack) or attack.gradient_free:
            raise TypeError(f"{type(self).__name__} wraps a gradient attack (FGSM, PGD, APGD, "
                            f"EOT, BPDA, ...), got {type(attack).__name__}")
        super().__init__(attack.threat)
        self.attack = attack

    @property
    def label(self) -> str:
        """``<name>-<wrapped attack's label>``, e.g. ``bpda-pgd``."""
        return f"{self.name}-{self.attack.label}"


def resolve_loss(loss: str | Loss):
    """Validated loss enum and its function."""
    parsed = parse_enum(Loss, loss, "loss")
    return parsed, loss_fn(parsed)
