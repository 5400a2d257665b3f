"""Zoo entries of IBP-trained models (registered when ``unmask.defenses`` is imported).

Architectures hold only layers the bounds support (no max pooling), so IBP, CROWN and, for the
MLP, the exact MILP apply. All train on mnist5k's train split in CPU minutes.
"""

from __future__ import annotations

from torch import nn

from ..core import Normalize
from .archs import MNIST_MEAN, MNIST_STD
from .registry import register_model

__all__ = ["CertCNN", "cert_mlp"]

_COMMON = dict(dataset="mnist5k", recipe="ibp", seed=0, batch_size=64, lr=1e-3, norm="linf",
               eval_dataset="mnist5k", eval_samples=200, tags=("certified-training", "mnist"))


class CertCNN(nn.Sequential):
    """Normalize-Conv(16,4,s2)-ReLU-Conv(32,4,s2)-ReLU-FC(100)-ReLU-FC(10) (Gowal et al.'s small)."""

    def __init__(self) -> None:
        super().__init__(Normalize(MNIST_MEAN, MNIST_STD), nn.Conv2d(1, 16, 4, 2, 1), nn.ReLU(),
                         nn.Conv2d(16, 32, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(32 * 7 * 7, 100), nn.ReLU(), nn.Linear(100, 10))


def cert_mlp(hidden: int = 32) -> nn.Module:
    """Normalize-Flatten-FC(hidden)-ReLU-FC(10): small enough for the exact MILP."""
    return nn.Sequential(Normalize(MNIST_MEAN, MNIST_STD), nn.Flatten(), nn.Linear(784, hidden),
                         nn.ReLU(), nn.Linear(hidden, 10))


@register_model("mnist-cnn-ibp01", epochs=8, warmup_epochs=1, eps=0.1, **_COMMON)
def mnist_cnn_ibp01() -> nn.Module:
    """Small conv net on mnist5k, IBP training with an eps ramp at Linf 0.1."""
    return CertCNN()


@register_model("mnist-cnn-ibp03", epochs=10, warmup_epochs=1, eps=0.3, **_COMMON)
def mnist_cnn_ibp03() -> nn.Module:
    """Small conv net on mnist5k, IBP training with an eps ramp at Linf 0.3."""
    return CertCNN()


# 60 short epochs (about 30 s on one CPU thread): eps ramps to 1.1 x 0.3 over epochs 2-32,
# the loss weight of the clean term to 0.25. Measured on the suite's 100 samples at Linf 0.3
# (docs/certified.md): clean 0.84, IBP = CROWN = 0.30 certified, the MILP decides every sample
# (exact 0.31, ~0.25 s/sample), while PGD-100 alone still reports 0.41.
@register_model("mnist-mlp-ibp03", epochs=60, warmup_epochs=2,
                ramp_epochs=30, eps=0.3, train_eps_factor=1.1, final_kappa=0.25, **_COMMON)
def mnist_mlp_ibp03() -> nn.Module:
    """784-128-10 MLP on mnist5k, IBP training at Linf 0.3; small enough for the exact MILP."""
    return cert_mlp(128)
