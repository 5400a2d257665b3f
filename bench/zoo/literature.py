"""Zoo entries of the literature masking benchmark (registered when ``unmask.defenses`` is
imported): the trained ``mnist-cnn`` behind a published inference-time defense that was later
shown to mask gradients, nothing more trained (``recipe="none"``), tagged
``"masking-benchmark"``. The wrappers and their papers are in
:mod:`unmask.defenses.literature`; the benchmark that diagnoses them next to a reference
adaptive attack is :mod:`unmask.bench.perf.masking_benchmark`.

* ``mnist-cnn-thermometer``  thermometer code, 16 levels (Buckman et al. 2018; BPDA);
* ``mnist-cnn-resizepad``    random shrink in [0.85, 1] and random placement (Xie et al. 2018;
  EOT);
* ``mnist-cnn-sap``          stochastic activation pruning after every ReLU (Dhillon et al.
  2018; EOT);
* ``mnist-cnn-kwta``         k-winners-take-all, 10% of units per layer (Xiao et al. 2020;
  BPDA with ReLU, Tramer et al. 2020);
* ``mnist-cnn-purifier``     3 steps of entropy descent on the input inside forward, within
  Linf 0.3 (PixelDefend / Defense-GAN structure; BPDA identity);
* ``mnist-cnn-tvm``          total variation minimisation inside forward (Guo et al. 2018;
  BPDA identity);
* ``mnist-cnn-detector``     feature-squeezing detection (1 bit, L1 threshold 0.3) answering
  flagged inputs with saturated, gradient-free logits (Xu et al. 2018; BPDA through the gate
  with a margin loss).

Usage: ``zoo.load("mnist-cnn-kwta")``; ``zoo.list(tag="masking-benchmark")``.
"""

from __future__ import annotations

from torch import nn

from ...defenses.literature import (
    EntropyPurification,
    KWinnersTakeAll,
    RandomResizePadding,
    SqueezingDetector,
    StochasticActivationPruning,
    ThermometerEncoding,
    TVMinimization,
)
from .registry import register_model

__all__: list[str] = []

_BENCHMARK = dict(dataset="mnist5k", base="mnist-cnn", recipe="none",
                  tags=("masking-benchmark", "mnist"))


@register_model("mnist-cnn-thermometer", **_BENCHMARK)
def mnist_cnn_thermometer(base: nn.Module) -> nn.Module:
    """mnist-cnn behind a 16-level thermometer code (Buckman et al. 2018; BPDA breaks it)."""
    return ThermometerEncoding(base, levels=16)


@register_model("mnist-cnn-resizepad", **_BENCHMARK)
def mnist_cnn_resizepad(base: nn.Module) -> nn.Module:
    """mnist-cnn behind random resizing and padding (Xie et al. 2018; EOT breaks it)."""
    return RandomResizePadding(base, min_scale=0.85, seed=0)


@register_model("mnist-cnn-sap", **_BENCHMARK)
def mnist_cnn_sap(base: nn.Module) -> nn.Module:
    """mnist-cnn with stochastic activation pruning (Dhillon et al. 2018; EOT breaks it)."""
    return StochasticActivationPruning(base, share=1.0, seed=0)


@register_model("mnist-cnn-kwta", **_BENCHMARK)
def mnist_cnn_kwta(base: nn.Module) -> nn.Module:
    """mnist-cnn with k-winners-take-all activations (Xiao et al. 2020; BPDA breaks it)."""
    return KWinnersTakeAll(base, ratio=0.1)


@register_model("mnist-cnn-purifier", **_BENCHMARK)
def mnist_cnn_purifier(base: nn.Module) -> nn.Module:
    """mnist-cnn behind entropy-descent purification in forward (BPDA identity breaks it)."""
    return EntropyPurification(base, steps=3, step_size=0.1, radius=0.3)


@register_model("mnist-cnn-tvm", **_BENCHMARK)
def mnist_cnn_tvm(base: nn.Module) -> nn.Module:
    """mnist-cnn behind total variation minimisation (Guo et al. 2018; BPDA breaks it)."""
    return TVMinimization(base, weight=0.03, steps=20, lr=0.1)


@register_model("mnist-cnn-detector", **_BENCHMARK)
def mnist_cnn_detector(base: nn.Module) -> nn.Module:
    """mnist-cnn with a feature-squeezing detector whose answer to a flagged input has no
    gradient (Xu et al. 2018; BPDA through the gate breaks it)."""
    return SqueezingDetector(base, bits=1, threshold=0.3)
