"""IBP certified training (Gowal et al. 2018) as a zoo recipe, with an eps ramp.

Loss: ``kappa * CE(z(x), y) + (1 - kappa) * CE(z_worst, y)`` where ``z_worst_j = -lower bound of
z_y - z_j`` over the Linf ball by IBP (and 0 for ``j = y``); eps grows linearly from 0 to the
target over ``ramp_epochs`` after ``warmup_epochs`` of clean training, while kappa goes 1 ->
``final_kappa`` (0.5 in Gowal et al.; 0, all weight on the worst case, is what CROWN-IBP (Zhang
et al. 2020) found best at large eps).
The card records the training time and the certified (IBP, CROWN) accuracy on the test split.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...bench import data
from ...bench.core import Threat
from ...bench.core.training import accuracy, fit, register_recipe
from . import certify
from .bounds import InputSet, ibp_bounds, margin_spec
from .network import to_chain

__all__ = ["ibp_loss", "ibp_training"]


def ibp_loss(model: nn.Module, x: Tensor, y: Tensor, eps: float, kappa: float) -> Tensor:
    """The IBP training loss for a batch (differentiable in the model's parameters)."""
    chain = to_chain(model, tuple(x.shape[1:]))
    clean = F.cross_entropy(chain.forward(x), y)
    if eps <= 0:
        return clean
    lo, hi = ibp_bounds(chain, InputSet(x, "linf", eps))[-1]
    k = lo.shape[1]
    spec = margin_spec(y, k).to(x.dtype)
    lower = (spec.clamp(min=0) * lo.unsqueeze(1) + spec.clamp(max=0) * hi.unsqueeze(1)).sum(-1)
    worst = torch.zeros(x.shape[0], k, device=x.device, dtype=x.dtype)
    mask = torch.ones_like(worst, dtype=torch.bool)
    mask[torch.arange(x.shape[0]), y] = False
    worst = worst.masked_scatter(mask, -lower)
    return kappa * clean + (1 - kappa) * F.cross_entropy(worst, y)


@register_recipe("ibp", label="IBP certified training")
def ibp_training(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int = 128,
                 lr: float = 1e-3, generator=0, progress: bool = True, checkpoint_dir=None,
                 norm: str = "linf", eps: float = 0.3, train_eps_factor: float = 1.1,
                 warmup_epochs: float = 1.0, ramp_epochs: float | None = None,
                 final_kappa: float = 0.5,
                 eval_dataset: str | None = None, eval_samples: int = 200,
                 **options: Any) -> tuple[nn.Module, dict[str, Any]]:
    """IBP training with an eps ramp at Linf ``eps`` (trained at ``train_eps_factor * eps``).

    Returns ``(model, metrics)`` with ``train_seconds`` and, with ``eval_dataset``, clean, IBP-
    and CROWN-certified accuracy on ``eval_samples`` test samples.
    """
    if norm != "linf":
        raise ValueError(f"IBP training supports norm 'linf', got {norm!r}")
    if not 0.0 <= final_kappa <= 1.0:
        raise ValueError(f"final_kappa must be in [0, 1], got {final_kappa}")
    ramp = ramp_epochs if ramp_epochs is not None else max(1.0, 0.5 * (epochs - warmup_epochs))
    target = eps * train_eps_factor
    state = {"p": 0.0}

    def on_batch(p: float) -> None:
        state["p"] = p

    def loss_fn(m, xb, yb, gen):
        frac = min(1.0, max(0.0, (state["p"] - warmup_epochs) / ramp))
        return ibp_loss(m, xb, yb, target * frac, 1.0 - (1.0 - final_kappa) * frac)

    start = time.perf_counter()
    fit(model, x, y, loss_fn, epochs=epochs, batch_size=batch_size, lr=lr, generator=generator,
        progress=progress, checkpoint_dir=checkpoint_dir, desc="ibp", on_batch=on_batch,
        **options)
    metrics: dict[str, Any] = {"train_seconds": time.perf_counter() - start, "eps": eps}
    if eval_dataset is not None:

        xt, yt = data.load(eval_dataset, "test", n=eval_samples)
        model.eval()
        metrics["clean_accuracy"] = accuracy(model, xt, yt)
        for method in ("ibp", "crown"):
            metrics[f"certified_{method}"] = certify(model, xt, yt, Threat("linf", eps),
                                                     method=method).certified_accuracy
    return model, metrics
