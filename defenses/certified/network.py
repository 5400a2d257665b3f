"""A feed-forward network as a chain of affine segments separated by ReLUs.

Every supported layer except ReLU is affine (Linear, Conv2d, Flatten, eval-mode BatchNorm,
average pooling, the package's ``Normalize``), so consecutive affine layers are fused into one
segment ``z = L(x) + b``. The bound methods (IBP, CROWN, MILP) only need, per segment, a
forward map, the linear part's transpose (a vector-Jacobian product) and, for IBP, ``|L|``.

A custom ``nn.Module`` (such as the zoo's ``MLP``) is flattened into its children in
registration order and the flattening is checked against the module's own forward on a probe
input; a mismatch means the layer order is not sequential and the model is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...bench.core import Normalize

__all__ = ["NotSupportedError", "Segment", "Chain", "to_chain"]

_AFFINE = (nn.Linear, nn.Conv2d, nn.Flatten, nn.BatchNorm1d, nn.BatchNorm2d, nn.AvgPool2d,
           nn.Identity, nn.Dropout, Normalize)


class NotSupportedError(ValueError):
    """Raised when a model holds a layer the bounds cannot handle; the message names it."""


def _abs_forward(layer: nn.Module, r: Tensor) -> Tensor:
    """``|L| r`` for the linear part of an affine layer (r >= 0): the IBP radius map."""
    if isinstance(layer, nn.Linear):
        return F.linear(r, layer.weight.abs())
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(r, layer.weight.abs(), None, layer.stride, layer.padding, layer.dilation,
                        layer.groups)
    if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d)):
        scale = (layer.weight if layer.weight is not None else 1.0) / torch.sqrt(
            layer.running_var + layer.eps)
        shape = (1, -1) + (1,) * (r.dim() - 2)
        return r * torch.as_tensor(scale).abs().reshape(shape)
    if isinstance(layer, Normalize):
        return r / layer.std
    return layer(r)  # Flatten, AvgPool2d (non-negative weights), Identity, eval Dropout


@dataclass
class Segment:
    """Fused affine layers ``z = L(x) + b``, followed by a ReLU unless it is the last segment."""

    layers: list[nn.Module]
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    def forward(self, x: Tensor) -> Tensor:
        """The segment's affine map ``L(x) + b`` (no ReLU), batch in, batch out."""
        for layer in self.layers:
            x = layer(x)
        return x

    def bias(self, device, dtype) -> Tensor:
        """``b = f(0)``, shape ``out_shape`` (one sample)."""
        return self.forward(torch.zeros((1,) + self.in_shape, device=device, dtype=dtype))[0]

    def abs_linear(self, r: Tensor) -> Tensor:
        """``|L| r`` for a radius ``r >= 0`` (no bias): how an IBP box's radius propagates."""
        for layer in self.layers:
            r = _abs_forward(layer, r)
        return r

    def vjp(self, a: Tensor) -> Tensor:
        """``A L`` for rows ``a`` of shape ``(M, *out_shape)``; returns ``(M, *in_shape)``."""
        z = torch.zeros((a.shape[0],) + self.in_shape, device=a.device, dtype=a.dtype,
                        requires_grad=True)
        with torch.enable_grad():
            out = self.forward(z)
            (g,) = torch.autograd.grad(out, z, grad_outputs=a)
        return g

    def dense(self, device, dtype) -> tuple[Tensor, Tensor]:
        """``(W, b)`` with ``W`` of shape ``(out, in)``: the segment as one matrix (small nets)."""
        n_in = 1
        for s in self.in_shape:
            n_in *= s
        eye = torch.eye(n_in, device=device, dtype=dtype).reshape((n_in,) + self.in_shape)
        b = self.bias(device, dtype)
        w = (self.forward(eye) - b).reshape(n_in, -1).T
        return w, b.reshape(-1)


@dataclass
class Chain:
    """``segments[0] -> ReLU -> segments[1] -> ReLU -> ... -> segments[-1]`` (logits)."""

    segments: list[Segment]

    def forward(self, x: Tensor) -> Tensor:
        """The logits of the chain: every segment, with a ReLU between consecutive ones."""
        for i, seg in enumerate(self.segments):
            x = seg.forward(x)
            if i < len(self.segments) - 1:
                x = torch.relu(x)
        return x


def _leaves(module: nn.Module) -> list[nn.Module]:
    if isinstance(module, (*_AFFINE, nn.ReLU)):
        return [module]
    children = list(module.children())
    if not children:
        raise NotSupportedError(f"not supported: {type(module).__name__}")
    out: list[nn.Module] = []
    for child in children:
        out.extend(_leaves(child))
    return out


def to_chain(model: nn.Module, input_shape: tuple[int, ...]) -> Chain:
    """Flatten ``model`` (eval mode) into a :class:`Chain` for inputs of ``input_shape`` (C,H,W).

    Raises :class:`NotSupportedError` ("not supported: <layer>") for any other layer, for a
    BatchNorm in train mode, and when the model's forward is not the sequential composition of
    its layers.
    """
    layers = _leaves(model)
    for layer in layers:
        if isinstance(layer, (nn.BatchNorm1d, nn.BatchNorm2d, nn.Dropout)) and layer.training:
            raise NotSupportedError(f"not supported: {type(layer).__name__} in train mode")
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    segments: list[Segment] = []
    current: list[nn.Module] = []
    shape = tuple(input_shape)
    probe = torch.zeros((1,) + shape, device=device)
    start_shape = shape
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, nn.ReLU):
                segments.append(Segment(current, start_shape, tuple(probe.shape[1:])))
                current, start_shape = [], tuple(probe.shape[1:])
                continue
            probe = layer(probe)
            current.append(layer)
        segments.append(Segment(current, start_shape, tuple(probe.shape[1:])))
    chain = Chain(segments)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((2,) + shape, generator=gen).to(device)
    with torch.no_grad():
        ref, got = model(x), chain.forward(x)
    if ref.shape != got.shape or not torch.allclose(ref, got, atol=1e-4, rtol=1e-4):
        raise NotSupportedError(
            f"not supported: {type(model).__name__} (its forward is not the sequential "
            "composition of its layers)")
    return chain
