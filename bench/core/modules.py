"""Small modules and helpers shared by every model: the ``Normalize`` layer, mixed precision
(``Precision``, ``Autocast``), device selection and the eval-mode context manager.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .enums import StrEnum, parse_enum

__all__ = ['Normalize', 'Precision', 'Autocast', 'select_device', 'model_mode']


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
        """The torch dtype of the precision (float32, bfloat16 or float16)."""
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
