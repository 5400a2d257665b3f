"""Adversarial training: PGD-AT (Madry et al., ICLR 2018, "Towards Deep Learning Models Resistant
to Adversarial Attacks") and fast FGSM-AT (Wong, Rice & Kolter, ICLR 2020, "Fast is better
than free"), with the linear eps warm-up both use on MNIST. TRADES lives in ``trades.py``, the
input-gradient penalty in ``gradreg.py``; all of them are losses for
:func:`unmask.bench.core.training.fit`, so they share its progress bar and resumable epochs.

Inner maximisation runs in eval mode with frozen parameters (``model_mode``), so BatchNorm
statistics see only the batches the model is trained on, and dropout does not randomise the
attack. The outer loss runs in train mode.

* ``pgd``  ``steps`` signed-gradient steps of ``step_size`` (default ``2.5 * eps / steps``)
  from a uniform random start, cross-entropy on the last iterate (Madry et al.).
* ``fast`` one signed step of ``1.25 * eps`` from a uniform random start, clipped back into
  the ball (Wong et al.): the cost of one extra forward/backward per batch.

Threat model: any ``Threat`` (Linf or L2); the steps are the norm's steepest ascent.

Usage::

    model = adversarial_training(model, x, y, threat=Threat("linf", 0.3), method="pgd",
                                 epochs=10, warmup_epochs=3)
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attacks.base import steepest_step
from ..attacks.fgsm import FGSM
from ..attacks.pgd import PGD
from ..bench import data
from ..bench.core import StrEnum, Threat, check_inputs, make_generator, model_mode, parse_enum
from ..bench.core.registry import Registry
from ..bench.core.training import accuracy, fit, register_recipe

__all__ = ["TrainingMethod", "LOSSES", "AdversarialLoss", "PGDAdversarialLoss", "FastAdversarialLoss",
           "adversarial_training", "robustness_metrics", "pgd_at", "fast_at"]

log = logging.getLogger(__name__)


class TrainingMethod(StrEnum):
    """Adversarial-training methods of :func:`adversarial_training`."""

    PGD = "pgd"
    FAST = "fast"
    TRADES = "trades"


class AdversarialLoss:
    """Base of the training losses: ``loss(model, x, y, generator) -> scalar``.

    Holds the threat and the eps warm-up: eps grows linearly from 0 to ``threat.eps`` over the
    first ``warmup_epochs`` epochs (step sizes scale with it). :func:`fit` reports the progress
    through :meth:`set_progress`; a loss never told its progress uses the full eps.
    Subclasses implement :meth:`_perturb` (the inner maximisation) and :meth:`__call__`.
    """

    desc = "adversarial"

    def __init__(self, threat: Threat, warmup_epochs: float = 0.0) -> None:
        if not isinstance(threat, Threat):
            raise TypeError(f"threat must be a Threat(norm, eps), got {type(threat).__name__}")
        if not warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
        self.threat = threat
        self.warmup_epochs = float(warmup_epochs)
        self.progress = math.inf

    def set_progress(self, epochs: float) -> None:
        """Training progress in epochs (``fit``'s ``on_batch`` hook)."""
        self.progress = float(epochs)

    @property
    def eps_scale(self) -> float:
        """Share of ``eps`` in use: rises linearly from 0 to 1 over ``warmup_epochs`` (1.0
        without warm-up).
        """
        if self.warmup_epochs == 0:
            return 1.0
        return min(1.0, self.progress / self.warmup_epochs)

    @property
    def current_threat(self) -> Threat:
        """The threat at the current point of the warm-up."""
        return Threat(self.threat.norm, self.threat.eps * self.eps_scale)

    def perturb(self, model: nn.Module, x: Tensor, y: Tensor,
                generator: torch.Generator | None = None) -> Tensor:
        """Adversarial examples for ``(x, y)`` inside the current threat (eval mode, detached)."""
        threat = self.current_threat
        if threat.eps == 0:
            return x.detach()
        with model_mode(model):
            return self._perturb(model, x.detach(), y, threat, generator).detach()

    def _perturb(self, model, x, y, threat, generator) -> Tensor:
        raise NotImplementedError  # pragma: no cover - abstract

    def config(self) -> dict[str, Any]:
        """The loss's settings (method, threat, warm-up; subclasses add theirs) for the zoo
        entry's provenance.
        """
        return {"method": self.desc, **self.threat.to_dict(), "warmup_epochs": self.warmup_epochs}


def _input_gradient(loss: Tensor, x: Tensor) -> Tensor:
    (grad,) = torch.autograd.grad(loss, x)
    return grad


class PGDAdversarialLoss(AdversarialLoss):
    """Madry et al.: cross-entropy at a PGD point (``steps`` steps of ``step_size`` from a
    uniform random start). ``step_size`` is at the full eps and scales with the warm-up."""

    desc = "pgd"

    def __init__(self, threat: Threat, steps: int = 7, step_size: float | None = None,
                 random_start: bool = True, warmup_epochs: float = 0.0) -> None:
        super().__init__(threat, warmup_epochs)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if step_size is not None and not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size!r}")
        self.steps = steps
        self.step_size = float(step_size) if step_size is not None else 2.5 * threat.eps / steps
        self.random_start = bool(random_start)

    def _perturb(self, model, x, y, threat, generator) -> Tensor:
        step = self.step_size * self.eps_scale
        x_adv = threat.random_point(x, generator) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            # A summed loss: the step is a sign, and a mean would only shrink the gradient.
            grad = _input_gradient(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
            x_adv = threat.project(steepest_step(threat, x_adv.detach(), grad, step), x)
        return x_adv

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor,
                 generator: torch.Generator | None = None) -> Tensor:
        return F.cross_entropy(model(self.perturb(model, x, y, generator)), y)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "steps": self.steps, "step_size": self.step_size,
                "random_start": self.random_start}


class FastAdversarialLoss(PGDAdversarialLoss):
    """Wong et al.: one signed step of ``step_size`` (default ``1.25 * eps``) from a uniform
    random start, projected back into the ball; cross-entropy there."""

    desc = "fast"

    def __init__(self, threat: Threat, step_size: float | None = None,
                 warmup_epochs: float = 0.0) -> None:
        super().__init__(threat, steps=1,
                         step_size=step_size if step_size is not None else 1.25 * threat.eps,
                         random_start=True, warmup_epochs=warmup_epochs)


#: ``method -> factory(threat, *, steps, step_size, beta, warmup_epochs) -> AdversarialLoss``;
#: TRADES registers its loss from :mod:`unmask.defenses.trades`, so this module never imports it.
LOSSES: Registry[Callable[..., AdversarialLoss]] = Registry("adversarial-training method")


@LOSSES.register(TrainingMethod.PGD.value)
def _pgd_loss(threat: Threat, *, steps: int | None, step_size: float | None, beta: float,
              warmup_epochs: float) -> AdversarialLoss:
    return PGDAdversarialLoss(threat, steps=7 if steps is None else steps,
                              step_size=step_size, warmup_epochs=warmup_epochs)


@LOSSES.register(TrainingMethod.FAST.value)
def _fast_loss(threat: Threat, *, steps: int | None, step_size: float | None, beta: float,
               warmup_epochs: float) -> AdversarialLoss:
    if steps not in (None, 1):
        raise ValueError(f"method 'fast' takes one step, got steps={steps}")
    return FastAdversarialLoss(threat, step_size=step_size, warmup_epochs=warmup_epochs)


def _make_loss(method: TrainingMethod, threat: Threat, *, steps: int | None, step_size: float | None,
               beta: float, warmup_epochs: float) -> AdversarialLoss:
    return LOSSES.get(method.value)(threat, steps=steps, step_size=step_size, beta=beta,
                                    warmup_epochs=warmup_epochs)


def train_with_loss(model: nn.Module, x: Tensor, y: Tensor, loss: Any, *, epochs: int,
                    batch_size: int = 128, lr: float = 1e-3, generator=0, progress: bool = True,
                    checkpoint_dir=None, **fit_options: Any) -> nn.Module:
    """:func:`fit` with a scheduled loss (one that has ``set_progress``)."""
    x, y = check_inputs(x, y)
    hook = getattr(loss, "set_progress", None)
    return fit(model, x, y, loss, epochs=epochs, batch_size=batch_size, lr=lr,
               generator=generator, progress=progress, checkpoint_dir=checkpoint_dir,
               desc=getattr(loss, "desc", "train"), on_batch=hook, **fit_options)


def adversarial_training(model: nn.Module, x: Tensor, y: Tensor, *, threat: Threat,
                         method: str | TrainingMethod = "pgd", epochs: int = 10,
                         steps: int | None = None, step_size: float | None = None,
                         beta: float = 6.0, warmup_epochs: float = 0.0, batch_size: int = 128,
                         lr: float = 1e-3, generator: torch.Generator | int | None = 0,
                         progress: bool = True, checkpoint_dir=None,
                         **fit_options: Any) -> nn.Module:
    """Adversarially train ``model`` (in place) on ``(x, y)`` against ``threat``.

    Args:
        model: any module following the input convention (``N x C x H x W`` in [0, 1] -> logits).
        x, y: training images in [0, 1] and int64 labels.
        threat: the threat model trained against, e.g. ``Threat("linf", 0.3)``.
        method: ``"pgd"`` (Madry, default 7 steps), ``"fast"`` (Wong, FGSM with random
            start) or ``"trades"`` (Zhang, ``beta``, default 10 KL steps).
        steps, step_size: inner attack iterations and step size at the full eps (defaults:
            ``2.5 * eps / steps`` for pgd and trades, ``1.25 * eps`` for fast).
        warmup_epochs: eps ramps linearly from 0 over this many epochs (0: no warm-up).
        batch_size, lr, generator, progress, checkpoint_dir, optimizer, weight_decay: as for
            :func:`unmask.bench.core.training.fit` (Adam, cosine learning rate, seeded shuffling,
            resumable epochs).

    Returns:
        The trained model, in eval mode.
    """
    method = parse_enum(TrainingMethod, method, "adversarial-training method")
    loss = _make_loss(method, threat, steps=steps, step_size=step_size, beta=beta,
                      warmup_epochs=warmup_epochs)
    log.info("adversarial training: %s", loss.config())
    return train_with_loss(model, x, y, loss, epochs=epochs, batch_size=batch_size, lr=lr,
                           generator=generator, progress=progress, checkpoint_dir=checkpoint_dir,
                           **fit_options)


def robustness_metrics(model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
                       steps: int = 20, samples: int | None = 500,
                       generator: torch.Generator | int | None = 0) -> dict[str, Any]:
    """Clean, FGSM and PGD robust accuracy for a zoo card: ``samples`` evenly spaced samples
    of ``(x, y)``, PGD with ``steps`` steps and one restart, cross-entropy loss. FGSM far above
    PGD is the signature of single-step training overfitting to its own attack (Wong et al.'s
    catastrophic overfitting; Tramer et al. 2018)."""

    start = time.perf_counter()
    n = len(y)
    if samples is not None and samples < n:
        idx = torch.linspace(0, n - 1, samples).round().long()
        x, y = x[idx], y[idx]
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    result = PGD(threat, steps=steps)(model, x, y, generator=make_generator(generator))
    return {"clean_accuracy": accuracy(model, x, y),
            "robust_accuracy": result.robust_accuracy,
            "fgsm_robust_accuracy": FGSM(threat)(model, x, y).robust_accuracy,
            "attack": f"pgd-{steps}", **threat.to_dict(), "eval_samples": len(y),
            "eval_seconds": round(time.perf_counter() - start, 3)}


def evaluate_for_card(model: nn.Module, loss_config: dict[str, Any], threat: Threat, *,
                      eval_dataset: str | None, eval_samples: int, eval_steps: int,
                      train_seconds: float, eval_other_eps: Sequence[float] = ()
                      ) -> dict[str, Any]:
    """The metrics a recipe returns for the zoo card: the loss's settings, the training time
    and, with ``eval_dataset``, :func:`robustness_metrics` at the threat's eps (and, as
    ``robust_accuracy_by_eps``, at each of ``eval_other_eps``)."""
    metrics: dict[str, Any] = {**loss_config, "train_seconds": round(train_seconds, 3),
                               "threads": torch.get_num_threads()}
    if eval_dataset is not None:

        x_test, y_test = data.load(eval_dataset, "test")
        metrics["eval_dataset"] = eval_dataset
        metrics.update(robustness_metrics(model, x_test, y_test, threat, steps=eval_steps,
                                          samples=eval_samples))
        other = []
        for eps in eval_other_eps:
            m = robustness_metrics(model, x_test, y_test, Threat(threat.norm, eps),
                                   steps=eval_steps, samples=eval_samples)
            other.append({k: m[k] for k in ("eps", "robust_accuracy", "fgsm_robust_accuracy")})
        if other:
            metrics["robust_accuracy_by_eps"] = other
        log.info("%s: clean %.3f, %s robust %.3f at %s", loss_config.get("method"),
                 metrics["clean_accuracy"], metrics["attack"], metrics["robust_accuracy"], threat)
    return metrics


def _recipe(method: TrainingMethod, model, x, y, *, epochs, batch_size, lr, generator, progress,
            checkpoint_dir, norm, eps, steps, step_size, beta, warmup_epochs, eval_dataset,
            eval_samples, eval_steps, eval_other_eps=(), **options):
    threat = Threat(norm, eps)
    loss = _make_loss(method, threat, steps=steps, step_size=step_size, beta=beta,
                      warmup_epochs=warmup_epochs)
    start = time.perf_counter()
    model = train_with_loss(model, x, y, loss, epochs=epochs, batch_size=batch_size, lr=lr,
                            generator=generator, progress=progress,
                            checkpoint_dir=checkpoint_dir, **options)
    return model, evaluate_for_card(model, loss.config(), threat, eval_dataset=eval_dataset,
                                    eval_samples=eval_samples, eval_steps=eval_steps,
                                    train_seconds=time.perf_counter() - start,
                                    eval_other_eps=eval_other_eps)


@register_recipe("pgd-at", label="PGD-AT")
def pgd_at(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128,
           lr: float = 1e-3, generator=0, progress: bool = True, checkpoint_dir=None,
           norm: str = "linf", eps: float = 0.3, steps: int = 7, step_size: float | None = None,
           warmup_epochs: float = 0.0, eval_dataset: str | None = None, eval_samples: int = 500,
           eval_steps: int = 20, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """PGD adversarial training (Madry et al. 2018) as a zoo recipe.

    The threat is given as ``norm`` and ``eps`` (JSON-able recipe options). With
    ``eval_dataset`` the card gets clean, FGSM and PGD-``eval_steps`` robust accuracy on
    ``eval_samples`` test samples (also at each eps of the option ``eval_other_eps``).
    Returns ``(model, metrics)``.
    """
    return _recipe(TrainingMethod.PGD, model, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                   generator=generator, progress=progress, checkpoint_dir=checkpoint_dir,
                   norm=norm, eps=eps, steps=steps, step_size=step_size, beta=0.0,
                   warmup_epochs=warmup_epochs, eval_dataset=eval_dataset,
                   eval_samples=eval_samples, eval_steps=eval_steps, **options)


@register_recipe("fast-at", label="fast FGSM-AT")
def fast_at(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128,
            lr: float = 1e-3, generator=0, progress: bool = True, checkpoint_dir=None,
            norm: str = "linf", eps: float = 0.3, step_size: float | None = None,
            warmup_epochs: float = 0.0, eval_dataset: str | None = None, eval_samples: int = 500,
            eval_steps: int = 20, **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """Fast FGSM adversarial training with random start (Wong et al. 2020) as a zoo recipe;
    options as for ``pgd-at``. Returns ``(model, metrics)``."""
    return _recipe(TrainingMethod.FAST, model, x, y, epochs=epochs, batch_size=batch_size, lr=lr,
                   generator=generator, progress=progress, checkpoint_dir=checkpoint_dir,
                   norm=norm, eps=eps, steps=None, step_size=step_size, beta=0.0,
                   warmup_epochs=warmup_epochs, eval_dataset=eval_dataset,
                   eval_samples=eval_samples, eval_steps=eval_steps, **options)
