"""Per-sample attack losses, all to be *maximised* by the attacker.

* ``ce``      cross-entropy of the true label (untargeted) or minus that of the target;
* ``margin``  Carlini & Wagner's logit margin, ``max_{j != y} z_j - z_y`` (targeted:
  ``z_t - max_{j != t} z_j``); positive exactly when the attack succeeded;
* ``dlr``     Croce & Hein 2020's Difference of Logits Ratio, invariant to shifting and
  rescaling the logits, so a logit temperature cannot flatten it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..bench.core import StrEnum, margin, parse_enum

__all__ = ["Loss", "loss_fn", "ce_loss", "margin_loss", "dlr_loss"]


class Loss(StrEnum):
    """The named attack losses: ``ce``, ``margin``, ``dlr`` (see the module docstring)."""
    CE = "ce"
    MARGIN = "margin"
    DLR = "dlr"


def ce_loss(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """Per-sample cross-entropy of the true label (untargeted) or minus that of the target
    (targeted): ``N x K`` logits -> ``N``.
    """
    if targets is None:
        return F.cross_entropy(logits, y, reduction="none")
    return -F.cross_entropy(logits, targets, reduction="none")


def margin_loss(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """Carlini & Wagner's logit margin, ``max_{j != y} z_j - z_y`` (targeted: ``z_t - max_{j != t}
    z_j``): positive exactly when the attack succeeded. ``N x K`` -> ``N``.
    """
    return -margin(logits, y, targets)


def dlr_loss(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """DLR (untargeted) and targeted DLR (Croce & Hein 2020, eqs. 6 and 7)."""
    z_sorted = logits.sort(dim=1).values
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    if targets is None:
        # The largest logit other than the true one.
        is_top = logits.argmax(1) == y
        z_other = torch.where(is_top, z_sorted[:, -2], z_sorted[:, -1])
        return -(z_y - z_other) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)
    z_t = logits.gather(1, targets[:, None]).squeeze(1)
    denom = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
    return -(z_y - z_t) / denom


_LOSSES: dict[Loss, Callable[..., Tensor]] = {
    Loss.CE: ce_loss,
    Loss.MARGIN: margin_loss,
    Loss.DLR: dlr_loss,
}


def loss_fn(name: str | Loss) -> Callable[[Tensor, Tensor, Tensor | None], Tensor]:
    """The per-sample loss called ``name`` (``ValueError`` naming the valid ones otherwise)."""
    return _LOSSES[parse_enum(Loss, name, "loss")]
