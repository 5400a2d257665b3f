"""Input validation: images, labels and logits are checked once, early, with messages that say
what was expected (shape, range, dtype, logits not probabilities).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ['ProbabilityOutputWarning', 'NonFiniteOutputError', 'check_images', 'check_labels', 'model_dtype', 'check_inputs', 'check_logits', 'warnings_once', 'looks_like_probabilities', 'warn_if_train_mode']


class ProbabilityOutputWarning(UserWarning):
    """The model returns probabilities, not logits: gradient attacks on it are unreliable."""


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
