"""Core types every unmask module shares: threat models, attack results, input validation,
the ``Normalize`` layer, device selection and seeding.

Conventions (see DESIGN.md):

* a model takes float inputs ``N x C x H x W`` in ``[0, 1]`` and returns logits ``N x K``;
* a threat model is ``Threat(norm, eps)``, and :meth:`Threat.project` is the one projection
  onto the eps-ball intersected with ``[0, 1]`` that every attack uses;
* every stochastic function takes a ``torch.Generator`` (see :func:`make_generator`).
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "Norm",
    "Threat",
    "AttackResult",
    "Normalize",
    "Precision",
    "Autocast",
    "ProbabilityOutputWarning",
    "NonFiniteOutputError",
    "LargeEpsWarning",
    "check_images",
    "check_labels",
    "check_inputs",
    "check_logits",
    "model_dtype",
    "warnings_once",
    "margin",
    "select_device",
    "make_generator",
    "uniform",
    "normal",
    "model_mode",
    "parse_enum",
    "StrEnum",
    "DRAWS",
    "robust_by_majority",
    "SampleOutcomes",
    "check_schema",
]


class StrEnum(str, enum.Enum):
    """A string enum that prints as its value: ``f"{Verdict.CLEAN}"`` is ``clean``, never
    ``Verdict.CLEAN`` (``enum.StrEnum`` of Python 3.11, here for 3.10 too)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


def parse_enum(enum_cls: type[enum.Enum], value: Any, what: str) -> Any:
    """Convert ``value`` to ``enum_cls``; a bad value raises ``ValueError`` naming the valid ones."""
    if isinstance(value, enum_cls):
        return value
    try:
        return enum_cls(str(value).lower() if isinstance(value, str) else value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"unknown {what} {value!r}; expected one of {valid}") from None


class Norm(StrEnum):
    """The norm of a threat model's perturbation ball."""

    LINF = "linf"
    L2 = "l2"


def _per_sample_l2(t: Tensor) -> Tensor:
    return t.flatten(1).norm(p=2, dim=1)


@dataclass(frozen=True)
class Threat:
    """A threat model: perturbations with ``||delta||_norm <= eps`` that keep the input in [0, 1].

    ``Threat("linf", 8 / 255)`` or ``Threat(Norm.L2, 0.5)``. eps is a finite float >= 0; an
    Linf eps above 1 (the diameter of [0, 1]) is refused, it is a typo for a radius in pixel
    units (``8`` for ``8/255``). :meth:`check_for` judges eps against an input's size.
    """

    norm: Norm
    eps: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", parse_enum(Norm, self.norm, "norm"))
        try:
            eps = float(self.eps)
        except (TypeError, ValueError):
            raise ValueError(f"eps must be a number, got {self.eps!r}") from None
        if math.isnan(eps) or math.isinf(eps):
            raise ValueError(f"eps must be finite, got {eps}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if self.norm is Norm.LINF and eps > 1.0:
            raise ValueError(
                f"Linf eps {eps:g} is larger than 1, the diameter of the [0, 1] input range: "
                f"every image is inside the ball. Radii are in [0, 1] units "
                f"(8/255 = {8 / 255:.4f}, not 8)")
        object.__setattr__(self, "eps", eps)

    def scaled(self, factor: float) -> Threat:
        """This threat with eps times ``factor``; an Linf radius is capped at 1 (the ball of
        radius 1 already holds the whole [0, 1] box)."""
        eps = self.eps * factor
        return Threat(self.norm, min(eps, 1.0) if self.norm is Norm.LINF else eps)

    def diameter(self, x: Tensor) -> float:
        """The diameter of the [0, 1] box of ``x``'s per-sample shape in this norm."""
        return 1.0 if self.norm is Norm.LINF else math.sqrt(x[0].numel())

    def check_for(self, x: Tensor, stacklevel: int = 3) -> None:
        """Judge eps against the inputs ``x`` (``N x C x H x W``).

        Raises ``ValueError`` when eps exceeds the box's diameter (L2 above sqrt(C*H*W)), and
        warns (:class:`LargeEpsWarning`) from half the diameter on: every input is then within
        eps of the constant 0.5 image, so no classifier that uses its input can be robust on
        two differently-labelled samples and robust accuracy says nothing about the model.
        """
        diameter = self.diameter(x)
        if self.eps > diameter + 1e-9:
            raise ValueError(
                f"{self.norm.value} eps {self.eps:g} is larger than {diameter:.4g}, the diameter "
                f"of the [0, 1] box of inputs of shape {tuple(x.shape[1:])}")
        if self.eps >= 0.5 * diameter:
            warnings.warn(
                f"{self.norm.value} eps {self.eps:g} is at least half the input box's diameter "
                f"({0.5 * diameter:.4g}): every input is within eps of the constant 0.5 image, "
                "so robust accuracy at this radius cannot separate classes", LargeEpsWarning,
                stacklevel=stacklevel)

    def __str__(self) -> str:
        return f"{self.norm.value}:{self.eps:g}"

    def project(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Project ``x_adv`` onto the eps-ball around ``x`` intersected with [0, 1].

        Linf: clamping each coordinate is the exact projection onto the intersection (a box).
        L2: clip to the box first, then scale the perturbation into the ball; scaling a
        perturbation that keeps ``x + delta`` in the box towards 0 stays in the box (the box is
        convex and contains ``x``), so the result is in both sets.
        """
        if self.norm is Norm.LINF:
            return torch.minimum(torch.maximum(x_adv, x - self.eps), x + self.eps).clamp_(0.0, 1.0)
        delta = x_adv.clamp(0.0, 1.0) - x
        norms = _per_sample_l2(delta).clamp_min(1e-12)
        factor = (self.eps / norms).clamp(max=1.0).view(-1, *([1] * (x.dim() - 1)))
        return (x + delta * factor).clamp_(0.0, 1.0)

    def distance(self, x_adv: Tensor, x: Tensor) -> Tensor:
        """Per-sample size of the perturbation in this threat's norm."""
        delta = (x_adv - x).flatten(1)
        if self.norm is Norm.LINF:
            return delta.abs().amax(dim=1)
        return delta.norm(p=2, dim=1)

    def contains(self, x_adv: Tensor, x: Tensor, atol: float = 1e-5) -> Tensor:
        """Per-sample bool: inside the ball (up to ``atol``) and inside [0, 1]."""
        in_box = (x_adv >= -atol).flatten(1).all(1) & (x_adv <= 1 + atol).flatten(1).all(1)
        return in_box & (self.distance(x_adv, x) <= self.eps + atol)

    def random_point(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A uniformly random point of the eps-ball around ``x`` (then clipped to [0, 1])."""
        if self.norm is Norm.LINF:
            delta = (uniform(x.shape, generator, x.device, x.dtype) * 2 - 1) * self.eps
        else:
            # Uniform in the L2 ball: a Gaussian direction and radius eps * U^(1/d).
            direction = normal(x.shape, generator, x.device, x.dtype)
            direction = direction / _per_sample_l2(direction).clamp_min(1e-12).view(
                -1, *([1] * (x.dim() - 1))
            )
            d = x[0].numel()
            radius = uniform((x.shape[0],), generator, x.device, x.dtype) ** (1.0 / d) * self.eps
            delta = direction * radius.view(-1, *([1] * (x.dim() - 1)))
        return self.project(x + delta, x)

    def to_dict(self) -> dict[str, Any]:
        return {"norm": self.norm.value, "eps": self.eps}


@dataclass
class AttackResult:
    """What every attack returns.

    Attributes:
        x_adv: ``N x C x H x W``; the best iterate per sample (adversarial where ``success``).
        success: bool ``N``; the attack's goal was reached (misclassified, or the target hit).
        margin: float ``N``; best margin found: ``z_y - max_{j != y} z_j`` (untargeted) or
            ``max_{j != t} z_j - z_t`` (targeted). Negative means success.
        forwards / backwards: int64 ``N``; model forward passes and input-gradient
            evaluations spent on each sample. Samples broken early stop costing.
        name, config: the attack's name and its settings, for provenance.
        expected_success: float ``N`` or None; for randomised models or transformations (EOT),
            the share of fresh random draws under which ``x_adv`` reaches the goal.
    """

    x_adv: Tensor
    success: Tensor
    margin: Tensor
    forwards: Tensor
    backwards: Tensor
    name: str
    config: dict[str, Any] = field(default_factory=dict)
    expected_success: Tensor | None = None

    @property
    def n_forward(self) -> int:
        return int(self.forwards.sum())

    @property
    def n_backward(self) -> int:
        return int(self.backwards.sum())

    @property
    def queries(self) -> Tensor:
        """Per-sample model queries (forward passes), the cost measure of score-based attacks."""
        return self.forwards

    @property
    def success_rate(self) -> float:
        return float(self.success.float().mean()) if self.success.numel() else 0.0

    def robust_accuracy(self, clean_correct: Tensor | None = None) -> float:
        """Share of samples the attack did not break (and, if given, that were correct)."""
        robust = ~self.success
        if clean_correct is not None:
            robust = robust & clean_correct.to(robust.device)
        return float(robust.float().mean()) if robust.numel() else 0.0


class ProbabilityOutputWarning(UserWarning):
    """The model returns probabilities, not logits: gradient attacks on it are unreliable."""


class LargeEpsWarning(UserWarning):
    """eps is at least half the input box's diameter: robustness there is meaningless."""


class NonFiniteOutputError(ValueError):
    """The model returned NaN or Inf logits: never counted as robustness, always an error."""


def check_images(x: Any, name: str = "x", dtype: torch.dtype | None = None) -> Tensor:
    """Validate a batch of images: a floating ``N x C x H x W`` tensor, finite, in [0, 1].

    ``dtype``: the floating dtype of the model the images go to; images of another floating
    dtype (float64 from numpy, float16) are converted to it. Integer images (uint8 0-255) are
    refused with the conversion to use.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape N x C x H x W, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have shape N x C x H x W (4 dimensions), got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        hint = " (uint8 pixels: x.float() / 255)" if x.dtype == torch.uint8 else ""
        raise TypeError(f"{name} must be a floating-point tensor in [0, 1], got dtype {x.dtype}"
                        f"{hint}")
    if dtype is not None and dtype.is_floating_point and x.dtype != dtype:
        x = x.to(dtype)
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} must be finite, found {bad} NaN/Inf entries")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0:
        raise ValueError(
            f"{name} must lie in [0, 1] (normalisation belongs inside the model), "
            f"got values in [{lo:.4g}, {hi:.4g}]"
        )
    return x


def check_labels(y: Any, n: int, num_classes: int | None = None, name: str = "y") -> Tensor:
    """Validate integer labels: int64 (or another integer dtype) of length ``n``, in range."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 labels, got {type(y).__name__}")
    if y.dtype in (torch.bool,) or y.is_floating_point() or y.is_complex():
        raise TypeError(f"{name} must hold integer class indices (int64), got dtype {y.dtype}")
    if y.dim() != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},) to match the batch, got {tuple(y.shape)}")
    y = y.long()
    if n and int(y.min()) < 0:
        raise ValueError(f"{name} holds negative class indices (min {int(y.min())})")
    if num_classes is not None and n and int(y.max()) >= num_classes:
        raise ValueError(
            f"{name} holds class index {int(y.max())} but the model has {num_classes} classes"
        )
    return y


def model_dtype(model: nn.Module | None) -> torch.dtype | None:
    """The dtype of ``model``'s first floating parameter or buffer (None: it has none)."""
    if model is None:
        return None
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def check_inputs(x: Any, y: Any, num_classes: int | None = None,
                 model: nn.Module | None = None) -> tuple[Tensor, Tensor]:
    """Validate an (images, labels) pair; returns them with labels as int64 on x's device and
    the images in ``model``'s floating dtype when a model is given (float64 data, fp32 model)."""
    x = check_images(x, dtype=model_dtype(model))
    y = check_labels(y, x.shape[0], num_classes)
    return x, y.to(x.device)


def check_logits(logits: Any, n: int | None = None, *, probabilities: str = "warn",
                 model: nn.Module | None = None, finite: bool = True,
                 labels: Tensor | None = None) -> Tensor:
    """Check a model's output: float ``N x K`` logits, all finite.

    NaN or Inf logits raise :class:`NonFiniteOutputError` naming the model and the share of
    rows affected: a NaN margin compares false both ways, so left alone it would count as "not
    broken" and pass a broken model as robust. ``finite=False`` is for diagnostics that
    localise where NaN appears (the gradient-flow audit), never for a robustness number.

    Outputs whose rows all lie in [0, 1] and sum to 1 are probabilities: cross-entropy on them
    saturates and hides the gradient, a classic source of false robustness. With
    ``probabilities="warn"`` this is reported with a :class:`ProbabilityOutputWarning`; with
    ``"raise"`` it is an error; ``"ignore"`` skips the check.

    ``labels``: the batch's labels; a label at or above the number of logits K is an error
    naming both (the one place the labels meet the model's class count).
    """
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the model must return a tensor of logits N x K, got {type(logits).__name__}"
        )
    if logits.dim() != 2:
        raise ValueError(f"the model must return logits of shape N x K, got {tuple(logits.shape)}")
    if n is not None and logits.shape[0] != n:
        raise ValueError(
            f"the model returned {logits.shape[0]} rows of logits for a batch of {n} inputs"
        )
    if labels is not None and labels.numel() and int(labels.max()) >= logits.shape[1]:
        raise ValueError(f"the labels go up to class {int(labels.max())} but the model returns "
                         f"{logits.shape[1]} logits (classes 0..{logits.shape[1] - 1})")
    bad_rows = ~torch.isfinite(logits.detach()).all(dim=1)
    if finite and bool(bad_rows.any()):
        k, rows = int(bad_rows.sum()), int(logits.shape[0])
        who = f"the model {type(model).__name__}" if model is not None else "the model"
        raise NonFiniteOutputError(
            f"{who} returned non-finite logits (NaN or Inf) on {k} of {rows} inputs "
            f"({100.0 * k / rows:.0f}%); a non-finite output is an error, never robustness: "
            "fix the model (e.g. a division by zero, a log of 0, an overflow in fp16)")
    if probabilities not in ("warn", "raise", "ignore"):
        raise ValueError(f"probabilities must be 'warn', 'raise' or 'ignore', got {probabilities!r}")
    if probabilities != "ignore" and logits.shape[1] > 1 and looks_like_probabilities(logits):
        msg = (
            "the model's outputs look like probabilities (every row in [0, 1] and summing to 1), "
            "not logits; gradients through a softmax saturate and make attacks look weaker than "
            "they are. Return logits (drop the final softmax)."
        )
        if probabilities == "raise":
            raise ValueError(msg)
        warnings.warn(msg, ProbabilityOutputWarning, stacklevel=3)
    return logits


@contextmanager
def warnings_once() -> Iterator[None]:
    """Collect the warnings raised inside and re-emit each distinct one (category and message)
    once on exit: one probability-output warning per diagnosis, not one per attack it runs."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        _reemit_once(caught)


def _reemit_once(caught: list[warnings.WarningMessage]) -> None:
    seen: set[tuple[type, str]] = set()
    for w in caught:
        key = (w.category, str(w.message))
        if key not in seen:
            seen.add(key)
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def looks_like_probabilities(logits: Tensor, atol: float = 1e-4) -> bool:
    """True when every row of ``logits`` lies in [0, 1] and sums to 1."""
    out = logits.detach().float()
    in_range = bool(((out >= -atol) & (out <= 1 + atol)).all())
    return in_range and bool(((out.sum(dim=1) - 1).abs() <= atol * out.shape[1]).all())


def margin(logits: Tensor, y: Tensor, targets: Tensor | None = None) -> Tensor:
    """Per-sample classification margin; negative exactly when the attack goal is met.

    Untargeted: ``z_y - max_{j != y} z_j``. Targeted: ``max_{j != t} z_j - z_t``.
    """
    if targets is None:
        true = logits.gather(1, y[:, None]).squeeze(1)
        other = logits.scatter(1, y[:, None], float("-inf")).amax(dim=1)
        return true - other
    tgt = logits.gather(1, targets[:, None]).squeeze(1)
    other = logits.scatter(1, targets[:, None], float("-inf")).amax(dim=1)
    return other - tgt


# One definition of robustness for a randomised model, used by the ensemble, the suite runner,
# the masking diagnosis, the pytest helper and the leaderboard: a sample is robust when the
# model classifies it correctly on a strict majority of DRAWS fresh forward passes. A tie
# counts as broken (the defense must win, not draw), and so does a NaN rate. 32 draws put the
# standard error of one sample's rate at <= 9 points, so a majority call errs only near 50%.
DRAWS = 32


def robust_by_majority(fooled_rate: Tensor) -> Tensor:
    """Bool ``N``: robust where the share of draws fooled is below one half (NaN: broken)."""
    return fooled_rate < 0.5


@dataclass(frozen=True)
class SampleOutcomes:
    """Who broke each of ``n`` samples: the per-sample record every evaluation of the same
    samples produces (the ensemble, the masking diagnosis with its follow-up), so that the
    reported robust accuracy can be the worst case over every attack that ran.

    Attributes:
        broken_by: per sample ``"clean"`` (misclassified without attack), the label of the
            first attack whose adversarial example, re-checked on the model in fp32 and inside
            the threat ball, is misclassified; or None (robust).
        fooled_rate: randomised models only: per sample the share of :data:`DRAWS` fresh draws
            fooled by its best adversarial example (robust iff :func:`robust_by_majority`).

    Usage: ``worst = ensemble_outcomes.merge(diagnosis_outcomes); worst.robust_accuracy``
    """

    broken_by: tuple[str | None, ...]
    fooled_rate: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "broken_by", tuple(self.broken_by))
        if self.fooled_rate is not None:
            rate = tuple(float(r) for r in self.fooled_rate)
            if len(rate) != len(self.broken_by):
                raise ValueError(f"fooled_rate has {len(rate)} entries for "
                                 f"{len(self.broken_by)} samples")
            object.__setattr__(self, "fooled_rate", rate)

    @property
    def n(self) -> int:
        return len(self.broken_by)

    @property
    def broken(self) -> Tensor:
        return torch.tensor([b is not None for b in self.broken_by], dtype=torch.bool)

    @property
    def robust_accuracy(self) -> float:
        return sum(b is None for b in self.broken_by) / self.n if self.n else 0.0

    def counts(self) -> dict[str, int]:
        """Samples broken per label (``"clean"`` included), in order of first appearance."""
        out: dict[str, int] = {}
        for b in self.broken_by:
            if b is not None:
                out[b] = out.get(b, 0) + 1
        return out

    def merge(self, other: SampleOutcomes) -> SampleOutcomes:
        """The per-sample worst case of two records of the same samples: broken when either
        broke it (this record's label wins where both did); the higher fooled rate."""
        if other.n != self.n:
            raise ValueError(f"cannot merge outcomes of {self.n} and {other.n} samples")
        broken_by = tuple(a if a is not None else b
                          for a, b in zip(self.broken_by, other.broken_by))
        rate = None
        if self.fooled_rate is not None or other.fooled_rate is not None:
            mine = self.fooled_rate or tuple(float(b is not None) for b in self.broken_by)
            theirs = other.fooled_rate or tuple(float(b is not None) for b in other.broken_by)
            rate = tuple(max(a, b) for a, b in zip(mine, theirs))
        return SampleOutcomes(broken_by, rate)

    def to_dict(self) -> dict[str, Any]:
        return {"broken_by": list(self.broken_by),
                "fooled_rate": None if self.fooled_rate is None else list(self.fooled_rate)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SampleOutcomes:
        return cls(tuple(d["broken_by"]), None if d.get("fooled_rate") is None
                   else tuple(d["fooled_rate"]))


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, as the first layer of a model.

    Normalisation lives inside the model so every attack works in [0, 1] pixel space.
    """

    def __init__(self, mean: Any, std: Any) -> None:
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std_t = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean_t.numel() != std_t.numel():
            raise ValueError(
                f"mean and std need one value per channel, got {mean_t.numel()} and {std_t.numel()}"
            )
        if bool((std_t <= 0).any()):
            raise ValueError(f"std must be > 0, got {std_t.tolist()}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"


class Precision(StrEnum):
    """The arithmetic a model runs in: full fp32, or autocast to bf16 / fp16."""

    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.value]


class Autocast(nn.Module):
    """``model`` run under ``torch.autocast`` in reduced precision; logits come back in fp32.

    Matrix products and convolutions run in bf16 (or fp16) on the device of the input:
    on GPUs and on CPUs with AVX-512 BF16 or AMX this is 1.5-3x faster than fp32 (measured in
    docs/performance.md). Logits differ from the fp32 model's by rounding (about 0.05 on the
    MNIST zoo), so a sample near the decision boundary can change its verdict: unmask uses it to
    *search* for adversarial examples and judges them with the fp32 model
    (``Ensemble(..., precision="bf16")``), never to report the model's accuracy.

    Usage: ``fast = Autocast(model, "bf16"); logits = fast(x)``
    """

    def __init__(self, model: nn.Module, precision: str | Precision = "bf16") -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.precision = parse_enum(Precision, precision, "precision")
        if self.precision is Precision.FP32:
            raise ValueError("Autocast needs a reduced precision ('bf16' or 'fp16'); "
                             "use the model itself for fp32")
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, dtype=self.precision.dtype):
            out = self.model(x)
        return out.float()

    def extra_repr(self) -> str:
        return f"precision={self.precision.value}"


def select_device(preferred: str | torch.device | None = None) -> torch.device:
    """The device to run on: ``preferred``, else ``$UNMASK_DEVICE``, else cuda > mps > cpu."""
    choice = preferred if preferred is not None else os.environ.get("UNMASK_DEVICE") or None
    if choice is not None:
        try:
            device = torch.device(choice)
        except (RuntimeError, TypeError):
            raise ValueError(
                f"unknown device {choice!r}; expected cpu, cuda, cuda:N or mps"
            ) from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {choice!r} was asked for but CUDA is not available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(f"device {choice!r} was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def make_generator(seed: int | torch.Generator | None = 0, device: str | torch.device = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with ``seed`` (an existing generator is passed through).

    unmask never touches the global RNG: every stochastic function takes one of these.
    """
    if isinstance(seed, torch.Generator):
        return seed
    if seed is None:
        seed = 0
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _draw(fn, shape, generator, device, dtype) -> Tensor:
    # A CPU generator drives sampling for tensors on any device, so a seed gives the same
    # numbers on CPU and GPU; a generator on the tensor's device samples in place.
    device = torch.device(device)
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    if generator.device.type == device.type:
        return fn(shape, generator=generator, device=device, dtype=dtype)
    return fn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def uniform(shape, generator: torch.Generator | None, device="cpu", dtype=torch.float32) -> Tensor:
    """``U[0, 1)`` samples of ``shape`` from ``generator``, placed on ``device``."""
    return _draw(torch.rand, tuple(shape), generator, device, dtype)


def normal(shape, generator: torch.Generator | None, device="cpu", dtype=torch.float32) -> Tensor:
    """Standard normal samples of ``shape`` from ``generator``, placed on ``device``."""
    return _draw(torch.randn, tuple(shape), generator, device, dtype)


@contextmanager
def model_mode(model: nn.Module, *, train: bool = False, freeze: bool = True) -> Iterator[nn.Module]:
    """Put ``model`` in eval (or train) mode with frozen parameters, and restore both on exit.

    Restores every module's own ``training`` flag and every parameter's ``requires_grad``,
    also when the body raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.train(train)
        if freeze:
            for p, _ in flags:
                p.requires_grad_(False)
        yield model
    finally:
        for m, was_training in modes:
            m.training = was_training
        for p, req in flags:
            p.requires_grad_(req)


def warn_if_train_mode(model: nn.Module, stacklevel: int = 3) -> None:
    """Warn when BatchNorm or Dropout layers are in train mode (unmask evaluates in eval mode)."""
    noisy = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    names = [n for n, m in model.named_modules() if isinstance(m, noisy) and m.training]
    if names:
        warnings.warn(
            f"model has BatchNorm/Dropout layers in train mode ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); unmask evaluates it in eval mode and restores "
            "the mode afterwards. Call model.eval() to silence this.",
            UserWarning,
            stacklevel=stacklevel,
        )


def check_schema(d: Any, current: int, kind: str) -> int:
    """The ``schema_version`` of a stored result dict ``d`` of type ``kind``, checked against the
    version this unmask writes (``current``). A dict without one was written before versions
    were recorded and reads as version 1; a newer version raises ``ValueError`` (its fields may
    mean something this unmask does not know), as does a ``d`` that is not a dict."""
    if not isinstance(d, dict):
        raise TypeError(f"a stored {kind} must be a dict, got {type(d).__name__}")
    version = d.get("schema_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"a stored {kind} has schema_version {version!r}; expected an int >= 1")
    if version > current:
        raise ValueError(f"this stored {kind} has schema_version {version}, newer than the "
                         f"{current} this unmask reads: upgrade unmask to read it")
    return version
