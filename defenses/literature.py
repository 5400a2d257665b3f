"""Inference-time defenses from the literature that were published as robust and later shown
to mask gradients: the positives of the masking benchmark (``unmask.bench.perf.masking_benchmark``).

Each wrapper puts the published mechanism around an already trained classifier (the zoo
wraps ``mnist-cnn``); nothing is retrained, so every one of them is, in truth, about as robust
as the classifier it wraps, and what a plain gradient attack reports above that is masking.
The adaptive attack that breaks each one is the one the breaking paper used (Athalye, Carlini
& Wagner, ICML 2018, "Obfuscated Gradients Give a False Sense of Security"; Tramer, Carlini,
Brendel & Madry, NeurIPS 2020, "On Adaptive Attacks to Adversarial Example Defenses"; Croce
et al., ICML 2022, "Evaluating the Adversarial Robustness of Adaptive Test-time Defenses").

==========================  ===================================  ============================
wrapper                     published as                         masks by / adaptive attack
==========================  ===================================  ============================
``ThermometerEncoding``     Buckman et al., ICLR 2018            shattered (a step function);
                                                                 BPDA with the soft
                                                                 thermometer
``RandomResizePadding``     Xie et al., ICLR 2018                stochastic; EOT
``StochasticActivation``    Dhillon et al., ICLR 2018 (SAP)      stochastic; EOT
``Pruning``
``KWinnersTakeAll``         Xiao et al., ICLR 2020 (k-WTA)       discontinuous activations;
                                                                 BPDA with ReLU (Tramer 2020)
``EntropyPurification``     PixelDefend-style purification       gradient descent inside
                            (Song et al., ICLR 2018; Defense-    forward, output detached;
                            GAN, Samangouei et al., ICLR 2018)   BPDA identity
``TVMinimization``          Guo et al., ICLR 2018 (total         a solver inside forward;
                            variation minimisation)              BPDA identity
``SqueezingDetector``       Xu, Evans & Qi, NDSS 2018 (feature   detection whose rejection
                            squeezing detection)                 answer has no gradient;
                                                                 BPDA through the gate
==========================  ===================================  ============================

Conventions (as :mod:`unmask.defenses.inference`): every wrapper takes ``N x C x H x W`` in
[0, 1] and returns ``N x K`` logits; the classifier's weights sit under ``.model`` in the
state dict; each non-differentiable stage is its own child module with a
``bpda_approximation`` method, so :class:`~unmask.attacks.BPDA` finds it. Non-differentiable
stages stay attached to the input's graph with a zero derivative (gradient attacks see a zero
gradient instead of a cut graph).

Randomness (resize-padding, SAP): the wrapper owns a CPU ``torch.Generator`` seeded with
``seed`` at construction (``reseed(seed)`` restarts the sequence); every forward pass draws
fresh randomness from it, per sample; the global RNG is never touched. ``seed=None`` uses
torch's default generator.

Usage::

    defended = ThermometerEncoding(model, levels=16)
    BPDA(PGD(Threat("linf", 0.3), steps=40))(defended, x, y)   # through the soft thermometer
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bench.core import uniform
from .inference import Defended, Quantize

__all__ = ["Thermometer", "ThermometerEncoding", "ResizePad", "RandomResizePadding",
           "SAP", "StochasticActivationPruning", "KWTA", "KWinnersTakeAll",
           "EntropyDescent", "EntropyPurification", "TVDescent", "TVMinimization",
           "RejectGate", "SqueezingDetector"]


def _zero_gradient(out: Tensor, x: Tensor) -> Tensor:
    """``out``'s values, attached to ``x``'s graph with a zero derivative."""
    return out.detach() + 0.0 * x


def _check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")


def _check_range(value, low: float, high: float, what: str, *, integer: bool = False) -> None:
    bad_type = isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float))
    if bad_type or not low <= value <= high:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{what} must be {kind} in [{low}, {high}], got {value!r}")


class _Seeded(nn.Module):
    """A wrapper that owns the generator its random stages draw from."""

    def _init_seed(self, seed: int | None) -> None:
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.reseed(seed)

    def reseed(self, seed: int | None) -> None:
        """Restart the sequence of random draws from ``seed`` (None: torch's default RNG)."""
        _check_seed(seed)
        self.seed = seed
        self.generator = None if seed is None else torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------
# Thermometer encoding (Buckman, Roy, Raffel & Goodfellow, ICLR 2018)


class Thermometer(nn.Module):
    """Thermometer code of every pixel with ``levels`` levels, decoded by the channel mean.

    ``encode(x)``: ``N x (C * levels) x H x W`` with channel ``(c, k)`` equal to
    ``1[x_c >= k / levels]``, k = 1..levels (Buckman et al. 2018, Sec. 3). The classifier it
    feeds was trained on pixels, not codes, so the code is read through a fixed linear decoder,
    the mean over the levels: ``floor(levels * x) / levels``. The discretisation, which is
    what masks the gradient, is Buckman's; the trained code classifier is not.

    ``bpda_approximation``: Buckman's own soft thermometer (used by Athalye et al. 2018 for
    BPDA), ``clip(levels * x - k + 1, 0, 1)``, decoded the same way; its decoded value is
    exactly ``x`` on [0, 1], so the approximation is the identity computed through the code.
    """

    def __init__(self, levels: int = 16) -> None:
        super().__init__()
        _check_range(levels, 2, 255, "levels", integer=True)
        self.levels = levels

    def _thresholds(self, x: Tensor) -> Tensor:
        k = torch.arange(1, self.levels + 1, device=x.device, dtype=x.dtype)
        return k.view(1, 1, -1, 1, 1)

    def encode(self, x: Tensor) -> Tensor:
        """The hard code, ``N x (C * levels) x H x W`` of 0/1 floats."""
        code = (x.unsqueeze(2) * self.levels >= self._thresholds(x)).to(x.dtype)
        return code.flatten(1, 2)

    def soft_encode(self, x: Tensor) -> Tensor:
        """The differentiable relaxation, same shape as :meth:`encode`."""
        code = (x.unsqueeze(2) * self.levels - self._thresholds(x) + 1).clamp(0, 1)
        return code.flatten(1, 2)

    def _decode(self, code: Tensor, channels: int) -> Tensor:
        n, _, h, w = code.shape
        return code.view(n, channels, self.levels, h, w).mean(2)

    def forward(self, x: Tensor) -> Tensor:
        return _zero_gradient(self._decode(self.encode(x), x.shape[1]), x)

    def bpda_approximation(self, x: Tensor) -> Tensor:
        """BPDA's backward pass: the decoded soft thermometer code (Buckman et al.'s relaxation)."""
        return self._decode(self.soft_encode(x), x.shape[1])

    def extra_repr(self) -> str:
        return f"levels={self.levels}"


class ThermometerEncoding(Defended):
    """``model`` behind a thermometer code of ``levels`` levels (Buckman et al., ICLR 2018,
    "Thermometer Encoding: One Hot Way To Resist Adversarial Examples"). Broken by Athalye et
    al. 2018 (Sec. 5.2.1) with BPDA through the soft thermometer. Masking: shattered (the
    code is a step function of the pixel: zero gradient everywhere)."""

    def __init__(self, model: nn.Module, levels: int = 16) -> None:
        super().__init__(model, preprocess=Thermometer(levels))


# ---------------------------------------------------------------------------------------------
# Random resizing and padding (Xie, Wang, Zhang, Ren & Yuille, ICLR 2018)


class ResizePad(nn.Module):
    """Per sample: shrink the image by a random factor in ``[min_scale, 1]`` (bilinear) and
    place it at a random position of a zero canvas of the original size.

    Xie et al. enlarge a 299-pixel image to a random size below 331 and pad it to 331; a
    classifier with a fixed input size (``mnist-cnn``'s 28 x 28) needs the canvas to keep its
    size, so here the image shrinks instead: the same random rescaling and random offset. One
    ``grid_sample`` per batch; differentiable in the input, random only through
    ``generator`` (a callable returning the owner's generator).
    """

    def __init__(self, min_scale: float, generator) -> None:
        super().__init__()
        _check_range(min_scale, 0.1, 1.0, "min_scale")
        self.min_scale = float(min_scale)
        self._generator = generator

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        u = uniform((n, 3), self._generator(), x.device, x.dtype)
        scale = self.min_scale + (1 - self.min_scale) * u[:, 0]
        # The shrunk image spans 2 * scale of the [-1, 1] canvas: its centre moves in
        # [-(1 - scale), 1 - scale] along each axis.
        shift = (2 * u[:, 1:] - 1) * (1 - scale)[:, None]
        theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
        theta[:, :, 2] = -shift / scale[:, None]
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def extra_repr(self) -> str:
        return f"min_scale={self.min_scale}"


class RandomResizePadding(_Seeded):
    """``model`` behind random resizing and padding (Xie et al., ICLR 2018, "Mitigating
    Adversarial Effects Through Randomization"); broken by Athalye et al. 2018 (Sec. 5.3.1)
    with EOT over the randomisation. Masking: stochastic."""

    def __init__(self, model: nn.Module, min_scale: float = 0.85, seed: int | None = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._init_seed(seed)
        self.preprocess = ResizePad(min_scale, lambda: self.generator)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.preprocess(x))


# ---------------------------------------------------------------------------------------------
# Activation-level defenses: they replace the classifier's ReLU modules (no parameters, so the
# state dict of the classifier is unchanged).


def _replace_relus(model: nn.Module, make) -> int:
    """Replace every ``nn.ReLU`` in ``model`` (in place) by ``make()``; the count replaced."""
    count = 0
    for name, child in list(model.named_children()):
        if isinstance(child, nn.ReLU):
            setattr(model, name, make())
            count += 1
        else:
            count += _replace_relus(child, make)
    return count


class SAP(nn.Module):
    """ReLU followed by stochastic activation pruning (Dhillon et al. 2018, Algorithm 1).

    Per sample, ``draws = ceil(share * D)`` units are drawn with replacement with probability
    ``p`` proportional to their activation ``|h|``; units never drawn are set to zero and the
    others are divided by their probability of being kept, ``1 - (1 - p)^draws``, so the
    layer is unbiased: ``E[SAP(h)] = h``. Each unit is kept independently with exactly that
    probability (Algorithm 1's marginal law; the draws themselves are not materialised,
    which would cost ``D`` indices per sample and layer). ``bpda_approximation``: that expectation (ReLU
    without pruning), as :class:`~unmask.defenses.GaussianNoiseInput` declares its identity.
    """

    def __init__(self, share: float, generator) -> None:
        super().__init__()
        _check_range(share, 0.01, 10.0, "share")
        self.share = float(share)
        self._generator = generator

    def forward(self, h: Tensor) -> Tensor:
        h = torch.relu(h)
        flat = h.flatten(1)
        d = flat.shape[1]
        draws = math.ceil(self.share * d)
        with torch.no_grad():
            p = flat / flat.sum(1, keepdim=True).clamp_min(1e-12)
            # Algorithm 1's chance that a unit is drawn at least once in ``draws`` draws with
            # replacement; units are kept independently with that chance (the same marginal
            # law per unit, without materialising ``draws`` indices per sample).
            keep = 1 - (1 - p).pow(draws)
            mask = (uniform(flat.shape, self._generator(), flat.device, flat.dtype) < keep)
        return (flat * mask.to(flat.dtype) / keep.clamp_min(1e-12)).view_as(h)

    def bpda_approximation(self, h: Tensor) -> Tensor:
        """BPDA's backward pass: the ReLU without pruning, the layer's expectation."""
        return torch.relu(h)

    def extra_repr(self) -> str:
        return f"share={self.share}"


class StochasticActivationPruning(_Seeded):
    """``model`` with stochastic activation pruning after every ReLU (Dhillon et al., ICLR
    2018, "Stochastic Activation Pruning for Robust Adversarial Defense"); broken by Athalye
    et al. 2018 (Sec. 5.3.2) with EOT over the pruning. Masking: stochastic.

    ``model`` is changed in place (its ``nn.ReLU`` modules become :class:`SAP`); its weights
    are untouched. Raises ``ValueError`` if it has no ``nn.ReLU`` module.
    """

    def __init__(self, model: nn.Module, share: float = 1.0, seed: int | None = 0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self._init_seed(seed)
        if not _replace_relus(model, lambda: SAP(share, lambda: self.generator)):
            raise ValueError("StochasticActivationPruning needs a model with nn.ReLU modules")
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


class KWTA(nn.Module):
    """k-winners-take-all activation (Xiao, Zhong & Zheng, ICLR 2020): per sample, the
    ``ceil(ratio * D)`` largest pre-activations of the layer pass, every other unit is zero.
    It replaces a ReLU; ``bpda_approximation`` is that ReLU (the smooth-enough function the
    attack differentiates instead, as in Tramer et al. 2020, Sec. 5.13)."""

    def __init__(self, ratio: float = 0.1) -> None:
        super().__init__()
        _check_range(ratio, 0.001, 1.0, "ratio")
        self.ratio = float(ratio)

    def forward(self, h: Tensor) -> Tensor:
        flat = h.flatten(1)
        k = math.ceil(self.ratio * flat.shape[1])
        kth = flat.topk(k, dim=1).values[:, -1:]
        return (flat * (flat >= kth).to(flat.dtype)).view_as(h)

    def bpda_approximation(self, h: Tensor) -> Tensor:
        """BPDA's backward pass: the ReLU that the k-winners-take-all layer replaces."""
        return torch.relu(h)

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}"


class KWinnersTakeAll(nn.Module):
    """``model`` with every ReLU replaced by k-WTA (Xiao, Zhong & Zheng, ICLR 2020,
    "Enhancing Adversarial Defense by k-Winners-Take-All"); broken by Tramer et al. 2020
    (Sec. 5.13). Masking: the active set of units jumps as the input moves, so the gradient
    is locally exact but says nothing a step away (discontinuous).

    The classifier was trained with ReLU, not k-WTA: ``ratio`` is chosen so that the clean
    accuracy barely changes. ``model`` is changed in place; its weights are untouched.
    """

    def __init__(self, model: nn.Module, ratio: float = 0.1) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not _replace_relus(model, lambda: KWTA(ratio)):
            raise ValueError("KWinnersTakeAll needs a model with nn.ReLU modules")
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


# ---------------------------------------------------------------------------------------------
# Purifiers: an optimisation on the input inside forward.


class EntropyDescent(nn.Module):
    """Purify ``x`` by ``steps`` signed gradient steps of ``step_size`` that lower the entropy
    of the classifier's prediction, staying within ``radius`` (Linf) of ``x`` and in [0, 1].

    This is the structure of PixelDefend (Song et al. 2018: move the input, within a ball,
    towards high likelihood under a density model) and Defense-GAN (Samangouei et al. 2018:
    gradient descent on a reconstruction objective) with the classifier's own confidence as
    the objective, so no generative model is needed. It calls ``torch.autograd.grad`` inside
    forward and returns a detached result (zero derivative). ``bpda_approximation``: the
    identity, Athalye et al. 2018's attack on both (Sec. 5.4.1, 5.4.2).
    """

    def __init__(self, steps: int = 10, step_size: float = 0.05, radius: float = 0.3) -> None:
        super().__init__()
        _check_range(steps, 1, 1000, "steps", integer=True)
        _check_range(step_size, 1e-6, 1.0, "step_size")
        _check_range(radius, 0.0, 1.0, "radius")
        self.steps, self.step_size, self.radius = steps, float(step_size), float(radius)

    def forward(self, x: Tensor, classifier: nn.Module) -> Tensor:
        start = x.detach()
        z = start.clone()
        with torch.enable_grad():
            for _ in range(self.steps):
                z.requires_grad_(True)
                logp = torch.log_softmax(classifier(z), dim=1)
                entropy = -(logp.exp() * logp).sum()
                (grad,) = torch.autograd.grad(entropy, z)
                z = z.detach() - self.step_size * grad.sign()
                z = torch.min(torch.max(z, start - self.radius), start + self.radius).clamp(0, 1)
        return _zero_gradient(z, x)

    def bpda_approximation(self, x: Tensor) -> Tensor:
        """BPDA's backward pass: the identity (the purification barely moves the input)."""
        return x

    def extra_repr(self) -> str:
        return f"steps={self.steps}, step_size={self.step_size}, radius={self.radius}"


class EntropyPurification(nn.Module):
    """``model`` applied to the input purified by :class:`EntropyDescent` (the PixelDefend /
    Defense-GAN family; broken by Athalye et al. 2018 with BPDA identity, which attacks the
    underlying model). Masking: shattered (autograd inside forward, detached output)."""

    def __init__(self, model: nn.Module, steps: int = 10, step_size: float = 0.05,
                 radius: float = 0.3) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.purify = EntropyDescent(steps, step_size, radius)
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.purify(x, self.model))


def total_variation(z: Tensor, smooth: float = 1e-3) -> Tensor:
    """Per-sample isotropic total variation ``sum sqrt(dx^2 + dy^2 + smooth)``, ``N``."""
    dx = z[..., :, 1:] - z[..., :, :-1]
    dy = z[..., 1:, :] - z[..., :-1, :]
    tv = (dx[..., :-1, :] ** 2 + dy[..., :, :-1] ** 2 + smooth).sqrt()
    return tv.flatten(1).sum(1)


class TVDescent(nn.Module):
    """Total variation minimisation, ``argmin_z ||z - x||^2 + weight * TV(z)``, solved by
    ``steps`` gradient steps of ``lr`` from ``x`` inside forward (``torch.autograd.grad``), the
    result clipped to [0, 1] and detached (zero derivative). Guo et al. 2018 solve the same
    objective (with a random pixel mask) by a solver; Athalye et al. 2018 (Sec. 5.2.2) break
    it with BPDA identity, the ``bpda_approximation`` here."""

    def __init__(self, weight: float = 0.03, steps: int = 20, lr: float = 0.1) -> None:
        super().__init__()
        _check_range(weight, 0.0, 10.0, "weight")
        _check_range(steps, 1, 1000, "steps", integer=True)
        _check_range(lr, 1e-6, 10.0, "lr")
        self.weight, self.steps, self.lr = float(weight), steps, float(lr)

    def forward(self, x: Tensor) -> Tensor:
        start = x.detach()
        z = start.clone()
        with torch.enable_grad():
            for _ in range(self.steps):
                z.requires_grad_(True)
                objective = ((z - start) ** 2).flatten(1).sum(1) + self.weight * total_variation(z)
                (grad,) = torch.autograd.grad(objective.sum(), z)
                z = (z.detach() - self.lr * grad).clamp(0, 1)
        return _zero_gradient(z, x)

    def bpda_approximation(self, x: Tensor) -> Tensor:
        """BPDA's backward pass: the identity (the denoising barely moves the input)."""
        return x

    def extra_repr(self) -> str:
        return f"weight={self.weight}, steps={self.steps}, lr={self.lr}"


class TVMinimization(Defended):
    """``model`` behind total variation minimisation (Guo, Rana, Cisse & van der Maaten, ICLR
    2018, "Countering Adversarial Images using Input Transformations"); broken by Athalye et
    al. 2018 with BPDA identity. Masking: shattered (a solver inside forward)."""

    def __init__(self, model: nn.Module, weight: float = 0.03, steps: int = 20,
                 lr: float = 0.1) -> None:
        super().__init__(model, preprocess=TVDescent(weight, steps, lr))


# ---------------------------------------------------------------------------------------------
# Detection (Xu, Evans & Qi, NDSS 2018; adaptive attacks on detectors: Carlini & Wagner 2017,
# Tramer et al. 2020)


class RejectGate(nn.Module):
    """``where(flagged, scale * logits.detach(), logits)``: a flagged input is answered with
    the classifier's own prediction at saturated confidence and no gradient.
    ``bpda_approximation``: the logits themselves (differentiate the classifier through the
    gate)."""

    def __init__(self, scale: float = 100.0) -> None:
        super().__init__()
        _check_range(scale, 1.0, 1e6, "scale")
        self.scale = float(scale)

    def forward(self, logits: Tensor, flagged: Tensor) -> Tensor:
        return torch.where(flagged[:, None], self.scale * logits.detach(), logits)

    def bpda_approximation(self, logits: Tensor) -> Tensor:
        """BPDA's backward pass: the logits themselves (differentiate the classifier through the
        gate).
        """
        return logits

    def extra_repr(self) -> str:
        return f"scale={self.scale:g}"


class SqueezingDetector(nn.Module):
    """``model`` with the feature-squeezing detector of Xu, Evans & Qi (NDSS 2018): an input
    is flagged when the L1 distance between the softmax on ``x`` and on its bit-depth-squeezed
    copy (``bits``) exceeds ``threshold``. Broken adaptively by He et al. 2017 ("ensembles of
    weak defenses are not strong") and, for detectors in general, Carlini & Wagner 2017 and
    Tramer et al. 2020, by attacking through the detector.

    How a rejected input counts (the conservative rule of this benchmark): a flagged input is
    answered, never abstained on. The wrapper returns the classifier's own prediction at
    saturated confidence (logits x ``scale``, detached: no gradient), so a flagged adversarial
    input is broken exactly when that answer is wrong. Detection earns the defense no credit:
    the wrapper's predictions are those of ``model`` on every input, and its true robust
    accuracy is ``model``'s. What it changes is the gradient: once an attack's iterate is
    flagged (typically before it is misclassified) the gradient is zero and the attack stops.
    The adaptive attack differentiates the classifier through the gate (BPDA on
    :class:`RejectGate`). ``detect(x)`` returns the flags (bool ``N``).
    """

    def __init__(self, model: nn.Module, bits: int = 1, threshold: float = 0.3,
                 scale: float = 100.0) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_range(threshold, 0.0, 2.0, "threshold")
        self.model = model
        self.squeeze = Quantize(bits)
        self.gate = RejectGate(scale)
        self.threshold = float(threshold)

    def _squeezed(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.softmax(self.model(self.squeeze(x)), dim=1)

    def _flags(self, logits: Tensor, squeezed: Tensor) -> Tensor:
        score = (torch.softmax(logits.detach(), dim=1) - squeezed).abs().sum(1)
        return score > self.threshold

    def detect(self, x: Tensor) -> Tensor:
        """Bool ``N``: which inputs the detector flags."""
        with torch.no_grad():
            squeezed = self._squeezed(x)
            return self._flags(self.model(x), squeezed)

    def forward(self, x: Tensor) -> Tensor:
        # The squeezed pass first: the classifier's last call is then the one on ``x`` (tools
        # that hook the classifier's layers, like the binarization test, see that one).
        squeezed = self._squeezed(x)
        logits = self.model(x)
        return self.gate(logits, self._flags(logits, squeezed))

    def extra_repr(self) -> str:
        return f"threshold={self.threshold}"
