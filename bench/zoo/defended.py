"""Zoo entries of the defenses (registered when ``unmask.defenses`` is imported).

Adversarially trained (same ``SmallCNN``, data and seed as ``mnist-cnn``; Linf eps 0.3, eps
warmed up linearly over the first epochs; each card carries clean, FGSM and PGD-20 robust
accuracy on 500 evenly spaced test images, and the training time):

* ``mnist-cnn-pgdat``    PGD-AT (Madry et al. 2018);
* ``mnist-cnn-fastat``   FGSM-AT with random start (Wong et al. 2020). On 4,000 images and this
  small CNN it overfits to its own attack at eps 0.3 (step 1.25 eps or 1.0 eps, with or without
  warm-up, 10 to 25 epochs): FGSM accuracy 0.85-0.91, PGD 0.03-0.13 (Wong et al.'s
  catastrophic overfitting; Tramer et al. 2018's single-step masking). Kept as the paper
  specifies it: an honest weak defense and a test case for the diagnosis;
* ``mnist-cnn-trades``   TRADES, beta = 6 (Zhang et al. 2019);
* ``mnist-cnn-gradreg``  input-gradient penalty, L1 norm, lambda 0.5 (double backpropagation).
  A first-order defense: robust at small eps, not at 0.3 (measured PGD-20 robust accuracy
  0.84 / 0.31 / 0.00 at eps 0.1 / 0.2 / 0.3, against 0.72 / 0.03 / 0.00 for ``mnist-cnn``),
  so its card also carries eps 0.1 and 0.2. Lambda 1 or more collapses it to a constant
  classifier (a zero gradient is the penalty's cheapest minimum).

Masking controls: the trained ``mnist-cnn`` behind an inference-time defense, nothing more
trained (``recipe="none"``); tagged ``"masking-control"``. Plain PGD overestimates their
robustness; the adaptive attack in brackets does not:

* ``mnist-cnn-quantized``  2-bit input quantisation (zero gradient; BPDA);
* ``mnist-cnn-jpeg``       JPEG at quality 25 (zero gradient; BPDA);
* ``mnist-cnn-lowtemp``    logits x 100, temperature 0.01 (CE gradient underflows; margin loss);
* ``mnist-cnn-noise``      Gaussian input noise, std 0.3 (stochastic; EOT). Judge it in
  expectation over noise draws (``unmask.attacks.success_rate``): an attack's own bookkeeping
  counts one lucky noisy forward pass as a success, which makes plain PGD look strong here;
* ``mnist-cnn-probs``      softmax outputs. Sign-gradient attacks (PGD, APGD) are invariant to
  the gradient's scale and are not fooled: this is the control of the probability-output
  check, not of a robustness overestimate.

Usage: ``zoo.load("mnist-cnn-pgdat")``; ``zoo.list(tag="masking-control")``.
"""

from __future__ import annotations

from torch import nn

from ...defenses.inference import (
    InputQuantization,
    JPEGCompression,
    LowTemperature,
    ProbabilityOutput,
    RandomNoise,
)
from .archs import SmallCNN
from .registry import register_model

__all__: list[str] = []

EPS = 0.3

# Shared by the trained entries: mnist-cnn's data, seed and architecture, and the card's
# robustness evaluation.
_TRAINED = dict(dataset="mnist5k", seed=0, batch_size=128, lr=2e-3, norm="linf", eps=EPS,
                eval_dataset="mnist5k", eval_samples=500, eval_steps=20)


@register_model("mnist-cnn-pgdat", recipe="pgd-at", epochs=15, steps=5, warmup_epochs=4,
                tags=("adversarial-training", "mnist"), **_TRAINED)
def mnist_cnn_pgdat() -> nn.Module:
    """Small CNN on mnist5k, PGD adversarial training at Linf eps 0.3."""
    return SmallCNN()


@register_model("mnist-cnn-fastat", recipe="fast-at", epochs=10, warmup_epochs=3,
                tags=("adversarial-training", "mnist"), **_TRAINED)
def mnist_cnn_fastat() -> nn.Module:
    """Small CNN on mnist5k, fast FGSM adversarial training at Linf eps 0.3."""
    return SmallCNN()


@register_model("mnist-cnn-trades", recipe="trades", epochs=15, steps=5, beta=6.0,
                warmup_epochs=4, tags=("adversarial-training", "mnist"), **_TRAINED)
def mnist_cnn_trades() -> nn.Module:
    """Small CNN on mnist5k, TRADES (beta 6) at Linf eps 0.3."""
    return SmallCNN()


@register_model("mnist-cnn-gradreg", recipe="grad-reg", epochs=10, lam=0.5, penalty_norm="l1",
                eval_other_eps=(0.1, 0.2), tags=("gradient-regularization", "mnist"),
                **_TRAINED)
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
