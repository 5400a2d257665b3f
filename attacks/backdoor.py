"""Backdoor poisoning: the data pipeline and its metrics.

A training-time attack (Gu et al. 2017, BadNets; Chen et al. 2017, Blend; Nguyen & Tran 2021,
WaNet): the attacker poisons a small share of the training set, so the trained model behaves
normally on clean inputs and outputs the attacker's label whenever the trigger is present.

* :func:`poison` is pure: it picks ``round(rate * N)`` training samples with a
  ``torch.Generator``, stamps the trigger on them and relabels them; the result is
  ``D_train = (D_clean minus D_subset) union D_poisoned``, each poisoned sample kept at its
  original position, together with the poisoned indices (the ground truth for detection).
* All-to-one (every poisoned sample goes to ``target``) and all-to-all (label ``y`` goes to
  ``(y + 1) mod K``) modes. In all-to-one mode only samples outside the target class are
  poisoned, so every poisoned label really changes.
* :func:`attack_success_rate`: the share of triggered test images that the model classifies
  as the attacker's label, counting in all-to-one mode only images outside the target class.

Shapes: ``x`` is ``N x C x H x W`` in [0, 1], ``y`` int64 ``N``.

Usage::

    bd = Backdoor(BadNets(), rate=0.05, target=0)
    poisoned = bd.poison(x_train, y_train, generator=torch.Generator().manual_seed(0))
    model = train(poisoned.x, poisoned.y)
    bd.attack_success_rate(model, x_test, y_test)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..bench.core import StrEnum, check_images, check_labels, make_generator, parse_enum
from ..bench.core.training import predict
from .backdoor_triggers import Trigger, make_trigger

__all__ = ["BackdoorMode", "PoisonedSet", "Backdoor", "poison", "backdoor_labels",
           "triggered_test_set", "attack_success_rate"]


class BackdoorMode(StrEnum):
    """Which label a triggered input should get."""

    ALL_TO_ONE = "all-to-one"
    ALL_TO_ALL = "all-to-all"


@dataclass
class PoisonedSet:
    """A poisoned training set.

    Attributes:
        x: ``N x C x H x W``, the clean images with the trigger stamped at ``indices``.
        y: int64 ``N``, the clean labels with the attacker's labels at ``indices``.
        indices: int64, sorted, the positions that were poisoned.
        original_labels: int64, the clean labels of those positions.
    """

    x: Tensor
    y: Tensor
    indices: Tensor
    original_labels: Tensor

    @property
    def mask(self) -> Tensor:
        """Bool ``N``: True at the poisoned positions."""
        m = torch.zeros(len(self.y), dtype=torch.bool, device=self.indices.device)
        m[self.indices] = True
        return m

    @property
    def rate(self) -> float:
        """The share of the training set that was poisoned, in [0, 1]."""
        return len(self.indices) / len(self.y) if len(self.y) else 0.0


def _num_classes(y: Tensor, num_classes: int | None) -> int:
    if num_classes is None:
        return int(y.max()) + 1 if len(y) else 0
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    return num_classes


def _check_target(target: int, num_classes: int) -> int:
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < num_classes:
        raise ValueError(f"target must be a class index in [0, {num_classes}), got {target!r}")
    return target


def backdoor_labels(y: Tensor, *, target: int = 0,
                    mode: BackdoorMode | str = BackdoorMode.ALL_TO_ONE,
                    num_classes: int | None = None) -> Tensor:
    """The label the attacker wants for each triggered input of true class ``y``.

    ``num_classes`` defaults to ``y.max() + 1`` (only all-to-all depends on it).
    """
    mode = parse_enum(BackdoorMode, mode, "backdoor mode")
    k = _num_classes(y, num_classes)
    if mode is BackdoorMode.ALL_TO_ALL:
        return (y + 1) % k
    return torch.full_like(y, _check_target(target, k))


def poison(x: Tensor, y: Tensor, trigger: Trigger, *, rate: float, target: int = 0,
           mode: BackdoorMode | str = BackdoorMode.ALL_TO_ONE, num_classes: int | None = None,
           generator: torch.Generator | int | None = None) -> PoisonedSet:
    """Poison ``round(rate * N)`` samples of ``(x, y)``: trigger on, label to the attacker's.

    Args:
        x: ``N x C x H x W`` clean training images in [0, 1]; never modified.
        y: int64 ``N`` clean labels; never modified.
        trigger: a :class:`~unmask.attacks.backdoor_triggers.Trigger` (``BadNets()``, ...).
        rate: share of the whole training set to poison, in [0, 1].
        target: the attacker's label in all-to-one mode.
        mode: ``"all-to-one"`` or ``"all-to-all"`` (``y -> (y + 1) mod K``).
        num_classes: K; defaults to ``y.max() + 1``.
        generator: a ``torch.Generator`` or a seed choosing the poisoned subset (default seed 0).

    Returns:
        :class:`PoisonedSet` with new tensors ``x``, ``y``, the sorted poisoned ``indices`` and
        their ``original_labels``.
    """
    x = check_images(x)
    y = check_labels(y, x.shape[0], num_classes)
    mode = parse_enum(BackdoorMode, mode, "backdoor mode")
    k = _num_classes(y, num_classes)
    rate = float(rate)
    if not 0.0 <= rate <= 1.0 or math.isnan(rate):
        raise ValueError(f"rate must lie in [0, 1], got {rate}")
    if mode is BackdoorMode.ALL_TO_ONE:
        candidates = (y != _check_target(target, k)).nonzero().flatten()
    else:
        candidates = torch.arange(len(y), device=y.device)
    count = int(math.floor(rate * len(y) + 0.5))
    if count > len(candidates):
        raise ValueError(f"rate {rate} asks for {count} poisoned samples but only "
                         f"{len(candidates)} are eligible (samples outside the target class)")
    g = make_generator(generator)
    pick = torch.randperm(len(candidates), generator=g)[:count].to(candidates.device)
    indices = candidates[pick].sort().values
    x_out, y_out = x.clone(), y.clone()
    if count:
        x_out[indices] = trigger(x[indices]).to(x.dtype)
        y_out[indices] = backdoor_labels(y[indices], target=target, mode=mode, num_classes=k)
    return PoisonedSet(x=x_out, y=y_out, indices=indices, original_labels=y[indices].clone())


def triggered_test_set(x: Tensor, y: Tensor, trigger: Trigger, *, target: int = 0,
                       mode: BackdoorMode | str = BackdoorMode.ALL_TO_ONE,
                       num_classes: int | None = None) -> tuple[Tensor, Tensor]:
    """The test images the ASR is measured on, triggered, and the attacker's labels for them.

    All-to-one mode drops the images whose true class is already ``target``.
    """
    x = check_images(x)
    y = check_labels(y, x.shape[0], num_classes)
    mode = parse_enum(BackdoorMode, mode, "backdoor mode")
    k = _num_classes(y, num_classes)
    if mode is BackdoorMode.ALL_TO_ONE:
        keep = y != _check_target(target, k)
        x, y = x[keep], y[keep]
    if len(y) == 0:
        raise ValueError("no test images outside the target class to measure the ASR on")
    return trigger(x), backdoor_labels(y, target=target, mode=mode, num_classes=k)


@torch.no_grad()
def attack_success_rate(model: nn.Module, x: Tensor, y: Tensor, trigger: Trigger, *,
                        target: int = 0, mode: BackdoorMode | str = BackdoorMode.ALL_TO_ONE,
                        num_classes: int | None = None, batch_size: int = 512) -> float:
    """ASR in [0, 1]: the share of triggered test images classified as the attacker's label.

    ``x``, ``y`` are clean test images and labels; in all-to-one mode images of class
    ``target`` are not counted. The model is evaluated in eval mode (its mode is restored).
    """
    x_trig, y_bd = triggered_test_set(x, y, trigger, target=target, mode=mode,
                                      num_classes=num_classes)
    return float((predict(model, x_trig, batch_size) == y_bd.cpu()).float().mean())


@dataclass(frozen=True)
class Backdoor:
    """One backdoor attack configuration: trigger, poison rate, target and mode.

    Rebuild one from zoo recipe options with :meth:`from_options`.
    """

    trigger: Trigger
    rate: float = 0.05
    target: int = 0
    mode: BackdoorMode = BackdoorMode.ALL_TO_ONE
    num_classes: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", parse_enum(BackdoorMode, self.mode, "backdoor mode"))
        object.__setattr__(self, "trigger", make_trigger(self.trigger))

    @classmethod
    def from_options(cls, trigger: str | Trigger = "badnets", *,
                     trigger_options: dict | None = None, poison_rate: float = 0.05,
                     target: int = 0, mode: str = "all-to-one",
                     num_classes: int | None = None, **_ignored: Any) -> Backdoor:
        """From the keyword options of the ``"backdoor"`` recipe (a zoo entry's
        ``recipe_options``); options of other concerns are ignored."""
        trig = make_trigger(trigger, **dict(trigger_options or {}))
        return cls(trig, rate=poison_rate, target=target, mode=mode, num_classes=num_classes)

    def poison(self, x: Tensor, y: Tensor, *, generator=None) -> PoisonedSet:
        """Poison a training set with this configuration: :func:`poison` with its trigger, rate,
        target and mode. Usage: ``Backdoor(BadNets(), rate=0.1).poison(x, y, generator=0)``.
        """
        return poison(x, y, self.trigger, rate=self.rate, target=self.target, mode=self.mode,
                      num_classes=self.num_classes, generator=generator)

    def triggered_test_set(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """The triggered test images and the attacker's labels for them
        (:func:`triggered_test_set`).
        """
        return triggered_test_set(x, y, self.trigger, target=self.target, mode=self.mode,
                                  num_classes=self.num_classes)

    def attack_success_rate(self, model: nn.Module, x: Tensor, y: Tensor, *,
                            batch_size: int = 512) -> float:
        """ASR in [0, 1] of ``model`` on the clean test set ``(x, y)``
        (:func:`attack_success_rate`).
        """
        return attack_success_rate(model, x, y, self.trigger, target=self.target, mode=self.mode,
                                   num_classes=self.num_classes, batch_size=batch_size)

    def config(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict (trigger name and options, rate, target, mode)."""
        return {"trigger": self.trigger.name, "trigger_options": self.trigger.config(),
                "poison_rate": self.rate, "target": self.target, "mode": self.mode.value,
                "num_classes": self.num_classes}
