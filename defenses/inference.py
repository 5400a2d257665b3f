"""Inference-time defenses: wrappers that put a transformation in front of (or behind) any
model. They are the positive controls of the masking diagnosis: each is known to make plain
gradient attacks report robustness the model does not have (Athalye, Carlini & Wagner, ICML
2018, "Obfuscated Gradients Give a False Sense of Security"; Carlini & Wagner 2016 for the
temperature).

=========================  =============================================  ====================
wrapper                    what it does                                   how it masks / the
                                                                          adaptive attack
=========================  =============================================  ====================
``InputQuantization``      round pixels to ``2**bits`` levels             shattered: zero
                           (bit-depth reduction, Xu et al. 2018)          gradient; BPDA
``JPEGCompression``        real JPEG encode/decode (torchvision, uint8)   shattered: zero
                           (Guo et al. 2018)                              gradient; BPDA
``LowTemperature``         logits / temperature (x 100 at 0.01)           vanishing: the CE
                                                                          gradient underflows;
                                                                          margin or DLR loss
``ProbabilityOutput``      softmax at the end                             vanishing: CE on
                                                                          probabilities; margin
                                                                          or DLR loss
``RandomNoise``            Gaussian noise on the input at every forward   stochastic; EOT
=========================  =============================================  ====================

Every wrapper is a :class:`Defended` module ``postprocess(model(preprocess(x)))``; the
transformation is its own child module (``.preprocess`` or ``.postprocess``) with a
``bpda_approximation(x)`` method, so :class:`~unmask.attacks.BPDA` finds it and differentiates
the identity in its place. The wrapped model keeps the input convention (``N x C x H x W`` in
[0, 1] -> ``N x K``), and its weights sit under ``.model`` in the state dict.

Non-differentiable transformations (quantisation, JPEG) stay attached to the input's autograd
graph with a zero derivative, as rounding in a differentiable framework does: gradient
attacks run on them and see a zero gradient rather than failing on a cut graph.

Randomness of :class:`RandomNoise`: each module owns a CPU ``torch.Generator`` seeded with
``seed`` when it is built, so the sequence of noise draws is reproducible for a given model
instance and call order, the global RNG is never touched, and every forward pass still draws
fresh noise (the point of the defense). ``seed=None`` draws from torch's default generator.

Usage::

    defended = InputQuantization(model, bits=2)
    BPDA(PGD(Threat("linf", 0.3)))(defended, x, y)      # attacks through the identity
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..bench.core import normal

__all__ = ["Defended", "Quantize", "JPEG", "GaussianNoiseInput", "ScaleLogits", "Softmax",
           "InputQuantization", "JPEGCompression", "LowTemperature", "ProbabilityOutput",
           "RandomNoise"]


def _zero_gradient(out: Tensor, x: Tensor) -> Tensor:
    """``out``'s values, attached to ``x``'s graph with a zero derivative."""
    return out.detach() + 0.0 * x


class Quantize(nn.Module):
    """Bit-depth reduction: round every value in [0, 1] to ``2**bits`` evenly spaced levels."""

    def __init__(self, bits: int = 2) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
            raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:
        top = 2**self.bits - 1
        return torch.round(x * top) / top  # torch.round has derivative 0: shattered gradient

    def bpda_approximation(self, x: Tensor) -> Tensor:
        """BPDA's backward pass: the identity (rounding is the identity up to a step)."""
        return x

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class JPEG(nn.Module):
    """Real JPEG compression at ``quality`` (1-100): values are rounded to uint8, encoded and
    decoded with torchvision (libjpeg) on the CPU, and returned on the input's device.
    1- or 3-channel images."""

    def __init__(self, quality: int = 25) -> None:
        super().__init__()
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"quality must be an int in [1, 100], got {quality!r}")
        self.quality = quality

    def forward(self, x: Tensor) -> Tensor:
        # Deferred: torchvision takes seconds to import; only its architectures/datasets need it.
        from torchvision.io import ImageReadMode, decode_jpeg, encode_jpeg

        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"JPEG takes N x C x H x W images with 1 or 3 channels, "
                             f"got shape {tuple(x.shape)}")
        images = (x.detach() * 255).round().clamp(0, 255).to("cpu", torch.uint8)
        encoded = encode_jpeg(list(images), quality=self.quality)
        mode = ImageReadMode.GRAY if x.shape[1] == 1 else ImageReadMode.RGB
        decoded = torch.stack(decode_jpeg(encoded, mode=mode))
        out = decoded.to(device=x.device, dtype=x.dtype) / 255
        return _zero_gradient(out, x)

    def bpda_approximation(self, x: Tensor) -> Tensor:
        """BPDA's backward pass: the identity (JPEG approximately preserves the image)."""
        return x

    def extra_repr(self) -> str:
        return f"quality={self.quality}"


class GaussianNoiseInput(nn.Module):
    """Add ``N(0, std^2)`` noise to every pixel at every forward pass (eval mode included),
    then clip to [0, 1]. Draws from a module-owned generator seeded with ``seed`` (None:
    torch's default generator)."""

    def __init__(self, std: float = 0.4, seed: int | None = 0) -> None:
        super().__init__()
        if not std >= 0:
            raise ValueError(f"std must be >= 0, got {std!r}")
        self.std = float(std)
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the noise sequence from ``seed``."""
        if seed is None:
            self.generator = None
            return
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, x: Tensor) -> Tensor:
        noise = normal(x.shape, self.generator, x.device, x.dtype)
        return (x + self.std * noise).clamp(0, 1)

    def bpda_approximation(self, x: Tensor) -> Tensor:
        """BPDA's backward pass: the identity (the expected Jacobian of additive noise)."""
        # The noise is additive: its expected Jacobian is the identity (EOT is the attack).
        return x

    def extra_repr(self) -> str:
        return f"std={self.std}, seed={self.seed}"


class ScaleLogits(nn.Module):
    """Multiply the logits by ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be > 0, got {scale!r}")
        self.scale = float(scale)

    def forward(self, z: Tensor) -> Tensor:
        return z * self.scale

    def bpda_approximation(self, z: Tensor) -> Tensor:
        """BPDA's backward pass: the unscaled logits (a temperature does not move the argmax)."""
        return z

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class Softmax(nn.Module):
    """Probabilities instead of logits: softmax over the classes."""

    def forward(self, z: Tensor) -> Tensor:
        return torch.softmax(z, dim=1)

    def bpda_approximation(self, z: Tensor) -> Tensor:
        """BPDA's backward pass: the logits themselves (attack the margin, not the
        probabilities).
        """
        return z


class Defended(nn.Module):
    """``postprocess(model(preprocess(x)))``; missing stages are the identity."""

    def __init__(self, model: nn.Module, *, preprocess: nn.Module | None = None,
                 postprocess: nn.Module | None = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.preprocess = preprocess if preprocess is not None else nn.Identity()
        self.model = model
        self.postprocess = postprocess if postprocess is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.postprocess(self.model(self.preprocess(x)))


class InputQuantization(Defended):
    """Bit-depth reduction in front of ``model`` (Xu, Evans & Qi, NDSS 2018, "Feature
    Squeezing"). ``bits=2``: four levels, so every pixel can cross a level within eps 0.3 and
    the defense gives no real Linf robustness there (one bit would: MNIST pixels sit at 0 or 1,
    half a unit from the threshold)."""

    def __init__(self, model: nn.Module, bits: int = 2) -> None:
        super().__init__(model, preprocess=Quantize(bits))


class JPEGCompression(Defended):
    """JPEG compression in front of ``model`` (Guo, Rana, Cisse & van der Maaten, ICLR 2018,
    "Countering Adversarial Images using Input Transformations")."""

    def __init__(self, model: nn.Module, quality: int = 25) -> None:
        super().__init__(model, preprocess=JPEG(quality))


class LowTemperature(Defended):
    """Softmax temperature ``temperature`` < 1: the logits are divided by it (multiplied by
    100 at the default 0.01), as defensive distillation's test-time model is (Carlini & Wagner
    2016, "Defensive Distillation is Not Robust to Adversarial Examples"). Predictions are
    unchanged; the softmax saturates, so the cross-entropy gradient underflows to exactly zero
    in float32 wherever the logit margin exceeds about ``104 * temperature``."""

    def __init__(self, model: nn.Module, temperature: float = 0.01) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        super().__init__(model, postprocess=ScaleLogits(1.0 / temperature))
        self.temperature = float(temperature)


class ProbabilityOutput(Defended):
    """``model`` returning softmax probabilities instead of logits. Predictions are unchanged;
    cross-entropy applied to probabilities is nearly flat (the inputs to its softmax lie in
    [0, 1])."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model, postprocess=Softmax())


class RandomNoise(Defended):
    """Gaussian noise of ``std`` added to the input at every forward pass (randomised
    smoothing without the vote: one noisy prediction per query). ``seed``: see the module
    docstring."""

    def __init__(self, model: nn.Module, std: float = 0.4, seed: int | None = 0) -> None:
        super().__init__(model, preprocess=GaussianNoiseInput(std, seed))
