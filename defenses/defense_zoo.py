"""Zoo entries of the defenses (registered when ``unmask.defenses`` is imported).

Adversarially trained (same ``SmallCNN``, data and seed as ``mnist-cnn``; Linf eps 0.3, eps
warmed up linearly over the first epochs; each card carries clean and PGD-20 robust accuracy
on 500 evenly spaced test images, and the training time):

* ``mnist-cnn-pgdat``    PGD-AT (Madry et al. 2018);
* ``mnist-cnn-fastat``   FGSM-AT with random start (Wong et al. 2020);
* ``mnist-cnn-trades``   TRADES, beta = 6 (Zhang et al. 2019);
* ``mnist-cnn-gradreg``  input-gradient penalty, L1 norm (double backpropagation).

Masking controls: the trained ``mnist-cnn`` behind an inference-time defense, nothing more
trained (``recipe="none"``); tagged ``"masking-control"``. Plain PGD overestimates their
robustness; the adaptive attack in brackets does not:

* ``mnist-cnn-quantized``  2-bit input quantisation (zero gradient; BPDA);
* ``mnist-cnn-jpeg``       JPEG at quality 25 (zero gradient; BPDA);
* ``mnist-cnn-lowtemp``    logits x 100, temperature 0.01 (CE gradient underflows; margin loss);
* ``mnist-cnn-noise``      Gaussian input noise, std 0.3 (stochastic; EOT);
* ``mnist-cnn-probs``      softmax outputs (probabilities instead of logits).

Usage: ``zoo.load("mnist-cnn-pgdat")``; ``zoo.list(tag="masking-control")``.
"""

from __future__ import annotations

from torch import nn

from ..bench.archs import SmallCNN
from ..bench.zoo import register_model
from .inference import (
    InputQuantization,
    JPEGCompression,
    LowTemperature,
    ProbabilityOutput,
    RandomNoise,
)

__all__: list[str] = []

EPS = 0.3

# Shared by the trained entries: mnist-cnn's data, seed and architecture, and the card's
# robustness evaluation.
_TRAINED = dict(dataset="mnist5k", seed=0, batch_size=128, lr=2e-3, norm="linf", eps=EPS,
                eval_dataset="mnist5k", eval_samples=500, eval_steps=20)


@register_model("mnist-cnn-pgdat", recipe="pgd-at", epochs=10, steps=5, warmup_epochs=3,
                tags=("adversarial-training", "mnist"), **_TRAINED)
def mnist_cnn_pgdat() -> nn.Module:
    """Small CNN on mnist5k, PGD adversarial training at Linf eps 0.3."""
    return SmallCNN()


@register_model("mnist-cnn-fastat", recipe="fast-at", epochs=10, warmup_epochs=3,
                tags=("adversarial-training", "mnist"), **_TRAINED)
def mnist_cnn_fastat() -> nn.Module:
    """Small CNN on mnist5k, fast FGSM adversarial training at Linf eps 0.3."""
    return SmallCNN()


@register_model("mnist-cnn-trades", recipe="trades", epochs=10, steps=5, beta=6.0,
                warmup_epochs=3, tags=("adversarial-training", "mnist"), **_TRAINED)
def mnist_cnn_trades() -> nn.Module:
    """Small CNN on mnist5k, TRADES (beta 6) at Linf eps 0.3."""
    return SmallCNN()


@register_model("mnist-cnn-gradreg", recipe="grad-reg", epochs=6, lam=0.3, penalty_norm="l1",
                tags=("gradient-regularization", "mnist"), **_TRAINED)
def mnist_cnn_gradreg() -> nn.Module:
    """Small CNN on mnist5k, input-gradient (L1) penalty; robust accuracy at Linf eps 0.3."""
    return SmallCNN()


_CONTROL = dict(dataset="mnist5k", base="mnist-cnn", recipe="none",
                tags=("masking-control", "mnist"))


@register_model("mnist-cnn-quantized", **_CONTROL)
def mnist_cnn_quantized(base: nn.Module) -> nn.Module:
    """mnist-cnn behind 2-bit input quantisation (masking control: BPDA breaks it)."""
    return InputQuantization(base, bits=2)


@register_model("mnist-cnn-jpeg", **_CONTROL)
def mnist_cnn_jpeg(base: nn.Module) -> nn.Module:
    """mnist-cnn behind JPEG compression at quality 25 (masking control: BPDA breaks it)."""
    return JPEGCompression(base, quality=25)


@register_model("mnist-cnn-lowtemp", **_CONTROL)
def mnist_cnn_lowtemp(base: nn.Module) -> nn.Module:
    """mnist-cnn with logits x 100 (masking control: a margin or DLR loss breaks it)."""
    return LowTemperature(base, temperature=0.01)


@register_model("mnist-cnn-noise", **_CONTROL)
def mnist_cnn_noise(base: nn.Module) -> nn.Module:
    """mnist-cnn with Gaussian input noise, std 0.3 (masking control: EOT breaks it)."""
    return RandomNoise(base, std=0.3, seed=0)


@register_model("mnist-cnn-probs", **_CONTROL)
def mnist_cnn_probs(base: nn.Module) -> nn.Module:
    """mnist-cnn returning softmax probabilities (control for the probability-output check)."""
    return ProbabilityOutput(base)
