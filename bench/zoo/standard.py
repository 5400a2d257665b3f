"""The zoo's plain entries: models trained with the standard recipe, nothing defended."""

from __future__ import annotations

from torch import nn

from .archs import MLP, SmallCNN
from .registry import register_model

__all__ = ["mnist_cnn", "digits_mlp"]


@register_model("mnist-cnn", dataset="mnist5k", recipe="standard", epochs=6, seed=0,
                batch_size=64, lr=2e-3, tags=("standard", "mnist"))
def mnist_cnn() -> nn.Module:
    """Small CNN on mnist5k, standard training."""
    return SmallCNN()


@register_model("digits-mlp", dataset="digits", recipe="standard", epochs=30, seed=0,
                batch_size=64, lr=3e-3, tags=("standard", "tiny"))
def digits_mlp() -> nn.Module:
    """Two-layer MLP on 8x8 digits: the tiniest zoo model, for tests."""
    return MLP(in_features=64, hidden=64)
