"""Fine-pruning: removing a backdoor by pruning dormant channels, then fine-tuning (Liu,
Dolan-Gavitt & Garg 2018, "Fine-Pruning: Defending Against Backdooring Attacks on Deep Neural
Networks").

Backdoors tend to live in channels that clean inputs leave dormant. The defender, holding a
small clean set, ranks the output channels of the last convolution by their mean activation on
it, prunes them in increasing order while the clean accuracy stays within
``max_accuracy_drop`` of the original (or a fixed ``prune_ratio``), then fine-tunes the pruned
model on the clean set (the pruned channels stay zero) so the backdoor's remaining weights are
overwritten.

Weight decay in the fine-tuning matters: the weights that carry a patch trigger see (almost)
no gradient from clean data, so plain fine-tuning leaves them in place (ASR stays 0.99 on
``mnist-cnn-badnets``), while with decay they shrink away. On that small CNN the backdoor runs
through channels that clean inputs use heavily, so the pruning itself removes little; the
fine-tuning does the work (an ablation with ``prune_ratio=0`` shows it).

Pruning zeroes a channel's weights and bias, which zeroes its output when no normalisation
follows (as in the zoo's ``SmallCNN``); behind a BatchNorm the channel becomes a constant and
still carries no information about the input.

Shapes: images ``N x C x H x W`` in [0, 1], labels int64 ``N``.

Usage::

    res = fine_pruning(model, x_clean, y_clean, generator=0)
    backdoor.attack_success_rate(res.model, x_test, y_test)
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from ..bench.core import check_inputs, make_generator
from ..bench.core.training import accuracy, cross_entropy_loss, fit
from .backdoor import resolve_layer, run_with_hook

__all__ = ["FinePruningResult", "fine_pruning"]

log = logging.getLogger(__name__)


@dataclass
class FinePruningResult:
    """The repaired model and what was done to it.

    Attributes:
        model: a pruned and fine-tuned copy (eval mode); the input model is untouched.
        layer: name of the pruned module.
        pruned: int64 indices of the pruned output channels.
        prune_ratio: share of the layer's channels pruned.
        accuracy_before, accuracy_pruned, accuracy_after: clean accuracy on the defender's
            validation data before, after pruning and after fine-tuning.
        config: the settings.
    """

    model: nn.Module
    layer: str
    pruned: Tensor
    prune_ratio: float
    accuracy_before: float
    accuracy_pruned: float
    accuracy_after: float
    config: dict[str, Any] = field(default_factory=dict)


@torch.no_grad()
def _mean_activation(model: nn.Module, module: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    total: list[Tensor] = []

    def hook(mod, inputs, output):
        dims = [d for d in range(output.dim()) if d != 1]
        total.append(output.detach().float().clamp_min(0).mean(dims).cpu() * output.shape[0])

    run_with_hook(model, module, hook, x, batch_size)
    return torch.stack(total).sum(0) / len(x)


def _channel_masks(module: nn.Module, channels: Tensor) -> dict[str, Tensor]:
    masks = {}
    for pname in ("weight", "bias"):
        p = getattr(module, pname, None)
        if isinstance(p, Tensor):
            m = torch.ones_like(p)
            m[channels.to(p.device)] = 0
            masks[pname] = m
    return masks


def _accuracy_with_pruned(model, module, channels, x, y, batch_size) -> float:
    def hook(mod, inputs, output):
        out = output.clone()
        out[:, channels.to(out.device)] = 0
        return out

    handle = module.register_forward_hook(hook)
    try:
        return accuracy(model, x, y, batch_size)
    finally:
        handle.remove()


def fine_pruning(model: nn.Module, x: Tensor, y: Tensor, *, layer: str | nn.Module | None = None,
                 prune_ratio: float | None = None, max_accuracy_drop: float = 0.04,
                 max_prune_ratio: float = 0.9, validation: tuple[Tensor, Tensor] | None = None,
                 epochs: int = 5, lr: float = 3e-3, weight_decay: float = 5e-3,
                 fine_tune_batch_size: int = 64,
                 generator: torch.Generator | int | None = None, batch_size: int = 512,
                 progress: bool = False) -> FinePruningResult:
    """Fine-prune a copy of ``model`` with the defender's clean data ``(x, y)``.

    Args:
        model: the (possibly backdoored) classifier; not modified.
        x, y: clean images ``N x C x H x W`` in [0, 1] and int64 labels: ranks the channels,
            fine-tunes, and (without ``validation``) checks the accuracy while pruning.
        layer: the layer whose output channels are pruned; None is the last ``nn.Conv2d`` run
            in the forward pass (Liu et al. prune the last convolution); or a name/module.
        prune_ratio: prune this share of the channels; None (default) prunes, dormant first,
            as many as keep the clean accuracy within ``max_accuracy_drop`` of the original.
        max_accuracy_drop: accuracy budget of the pruning phase (default 0.04, the paper's 4%).
        max_prune_ratio: never prune more than this share (default 0.9).
        validation: ``(x_val, y_val)`` for the accuracy checks; default ``(x, y)``.
        epochs, lr, weight_decay, fine_tune_batch_size: fine-tuning (cross-entropy, Adam with
            L2 weight decay, cosine learning rate; defaults 5 epochs, 3e-3, 5e-3, 64); 0 epochs
            prunes only.
        generator: a ``torch.Generator`` or seed for the fine-tuning order (default seed 0).
        batch_size: evaluation batch size.
        progress: show the fine-tuning progress bar.

    Returns:
        :class:`FinePruningResult` holding the repaired copy.
    """
    x, y = check_inputs(x, y)
    if prune_ratio is not None and not 0.0 <= float(prune_ratio) < 1.0:
        raise ValueError(f"prune_ratio must lie in [0, 1), got {prune_ratio}")
    if not 0.0 <= float(max_accuracy_drop) <= 1.0:
        raise ValueError(f"max_accuracy_drop must lie in [0, 1], got {max_accuracy_drop}")
    if not 0.0 < float(max_prune_ratio) < 1.0:
        raise ValueError(f"max_prune_ratio must lie in (0, 1), got {max_prune_ratio}")
    x_val, y_val = validation if validation is not None else (x, y)
    x_val, y_val = check_inputs(x_val, y_val)

    repaired = copy.deepcopy(model)
    for p in repaired.parameters():
        p.requires_grad_(True)
    name, module, _ = resolve_layer(repaired, layer, x, kind=nn.Conv2d)
    if not isinstance(getattr(module, "weight", None), Tensor):
        raise ValueError(f"layer {name!r} ({type(module).__name__}) has no weight to prune")
    activation = _mean_activation(repaired, module, x, batch_size)
    order = activation.argsort()  # dormant first
    n_channels = len(order)
    before = accuracy(repaired, x_val, y_val, batch_size)

    if prune_ratio is not None:
        count = int(math.floor(float(prune_ratio) * n_channels))
    else:
        # Accuracy falls (roughly) monotonically as more dormant channels go, so a binary
        # search finds the largest count within budget in log2(C) evaluations.
        lo, hi = 0, int(math.floor(float(max_prune_ratio) * n_channels))
        while lo < hi:
            mid = (lo + hi + 1) // 2
            acc = _accuracy_with_pruned(repaired, module, order[:mid], x_val, y_val, batch_size)
            if before - acc <= max_accuracy_drop:
                lo = mid
            else:
                hi = mid - 1
        count = lo
    pruned = order[:count].sort().values
    for pname, mask in _channel_masks(module, pruned).items():
        prune.custom_from_mask(module, pname, mask)
    pruned_acc = accuracy(repaired, x_val, y_val, batch_size)
    log.info("fine-pruning: pruned %d of %d channels of %s; clean accuracy %.4f -> %.4f", count,
             n_channels, name, before, pruned_acc)

    if epochs > 0:
        fit(repaired, x, y, cross_entropy_loss, epochs=epochs, batch_size=fine_tune_batch_size,
            lr=lr, weight_decay=weight_decay, generator=make_generator(generator),
            progress=progress, desc="fine-prune")
    for pname in ("weight", "bias"):
        if prune.is_pruned(module) and hasattr(module, pname + "_mask"):
            prune.remove(module, pname)
    repaired.eval()
    after = accuracy(repaired, x_val, y_val, batch_size)
    return FinePruningResult(model=repaired, layer=name, pruned=pruned,
                             prune_ratio=count / n_channels, accuracy_before=before,
                             accuracy_pruned=pruned_acc, accuracy_after=after,
                             config={"prune_ratio": prune_ratio,
                                     "max_accuracy_drop": float(max_accuracy_drop),
                                     "max_prune_ratio": float(max_prune_ratio), "epochs": epochs,
                                     "lr": lr, "fine_tune_batch_size": fine_tune_batch_size})
