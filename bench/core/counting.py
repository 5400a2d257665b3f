"""Counting wrapper: forward and backward passes a model actually served, per sample row.

As adv-lib's ``ForwardCounter``/``BackwardCounter``: every call of the wrapped model adds the
batch size to ``forwards``; every backward pass that reaches the model's output adds the batch
size to ``backwards``. Used to check that attacks' own per-sample cost accounting is exact and
to measure third-party attacks (e.g. the official AutoAttack) on the same footing.

Usage::

    counted = CountingModel(model)
    result = attack(counted, x, y)
    assert counted.forwards == int(result.forwards.sum())
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CountingModel(nn.Module):
    """Wraps ``model``; ``forwards``/``backwards`` count sample rows passed forward/backward.

    Args:
        model: any ``nn.Module`` mapping a batch ``(B, ...)`` to logits ``(B, C)``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.forwards = 0
        self.backwards = 0

    def reset(self) -> None:
        """Set both counters back to zero."""
        self.forwards = 0
        self.backwards = 0

    def forward(self, x: Tensor) -> Tensor:
        rows = int(x.shape[0])
        self.forwards += rows
        out = self.model(x)
        if torch.is_grad_enabled() and out.requires_grad:
            def _count(grad: Tensor) -> None:
                self.backwards += rows
            out.register_hook(_count)
        return out
