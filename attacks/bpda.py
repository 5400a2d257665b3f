"""BPDA: Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner, ICML 2018);
documented on :class:`BPDA`. Also :class:`StraightThroughMode`, the straight-through
replacement of non-differentiable torch functions it uses with ``functional=True``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..bench.core import AttackResult, check_inputs, margin, model_mode
from .base import Attack, WrapperAttack, register_attack

__all__ = ["BPDA", "STRAIGHT_THROUGH_OPS", "StraightThroughMode", "find_preprocessing"]


class _StraightThrough(torch.autograd.Function):
    """Forward: ``op(x)`` exactly. Backward: the identity (straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _ops(*names: str) -> set:
    found = set()
    for name in names:
        for owner in (torch, torch.Tensor):
            fn = getattr(owner, name, None)
            if fn is not None:
                found.add(fn)
    return found


#: The functions (and Tensor methods) ``StraightThroughMode`` approximates by the identity.
STRAIGHT_THROUGH_OPS = frozenset(_ops("round", "floor", "ceil", "trunc", "fix", "sign", "frac"))
# frac(x) = x - trunc(x) has gradient 1 almost everywhere already, but sign and the rounding
# family have gradient 0: the identity is the BPDA approximation of Athalye et al. (2018).


class StraightThroughMode(TorchFunctionMode):
    """Replace non-differentiable torch functions by straight-through versions.

    Inside ``with StraightThroughMode():`` every call of an op in ``ops`` (default
    ``STRAIGHT_THROUGH_OPS``) on a tensor that requires grad returns the op's exact value and
    back-propagates the identity. Calls with ``out=`` or without grad run unchanged.

    Args:
        ops: the torch functions / Tensor methods to approximate.
    Usage: ``with StraightThroughMode(): loss = f(model(x)); loss.backward()``
    """

    def __init__(self, ops=STRAIGHT_THROUGH_OPS) -> None:
        super().__init__()
        self.ops = frozenset(ops)
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        value = func(*args, **kwargs)
        if (func in self.ops and args and isinstance(args[0], torch.Tensor)
                and isinstance(value, torch.Tensor) and "out" not in kwargs
                and torch.is_grad_enabled() and args[0].requires_grad
                and args[0].is_floating_point() and value.shape == args[0].shape):
            self.calls += 1
            return _StraightThrough.apply(args[0], value.detach())
        return value


def find_preprocessing(model: nn.Module, approximations=None) -> list[tuple[str, nn.Module, Callable]]:
    """The (name, module, approximation) triples BPDA will hook in ``model``."""
    names = {m: n for n, m in model.named_modules()}
    by_name = dict(model.named_modules())
    found: dict[nn.Module, Callable] = {}
    for module in model.modules():
        approx = getattr(module, "bpda_approximation", None)
        if callable(approx):
            found[module] = approx
    if approximations is not None:
        items = (approximations.items() if isinstance(approximations, Mapping)
                 else ((a, None) for a in approximations))
        for key, fn in items:
            if isinstance(key, str):
                if key not in by_name:
                    raise ValueError(f"no module named {key!r} in the model; modules: "
                                     f"{', '.join(n for n in by_name if n) or '(none)'}")
                key = by_name[key]
            if not isinstance(key, nn.Module) or key not in names:
                raise ValueError(f"BPDA approximation key {key!r} is not a module of the model")
            found[key] = fn if fn is not None else (lambda t: t)
    return [(names[m], m, fn) for m, fn in found.items()]


@register_attack("bpda")
class BPDA(WrapperAttack):
    """BPDA: Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner, "Obfuscated
    Gradients Give a False Sense of Security", ICML 2018).

    Threat model: white-box against a model with non-differentiable preprocessing (quantisation,
    JPEG, thresholding, ...); the wrapped attack's ball and loss.

    Wraps any gradient attack. On the forward pass, non-differentiable preprocessing modules run
    as they are; on the backward pass their gradient is that of a differentiable approximation,
    the identity by default. Implemented with forward hooks that return
    ``approx(x) + (f(x) - approx(x)).detach()``, removed when the attack returns or raises.
    Modules declare their approximation with a method ``bpda_approximation(x)``; BPDA finds them
    in the model (:func:`find_preprocessing`).

    Functional ops: with ``functional=True`` the non-differentiable torch functions called
    anywhere in ``forward`` (``torch.round``, ``floor``, ``ceil``, ``trunc``, ``sign``, ``frac``
    and their ``Tensor`` methods, see ``STRAIGHT_THROUGH_OPS``) are replaced by straight-through
    versions while the attack computes gradients, through :class:`StraightThroughMode`: the
    forward value is the op's own, bit for bit, and the backward pass is the identity. This mode
    needs no module names; modules with a ``bpda_approximation`` are still hooked when present.
    Not covered: comparisons followed by casts (``(x > t).float()``), whose boolean intermediate
    carries no gradient at all.

    Success is re-checked on the model without hooks or mode, so ``success`` is exactly the true
    model's verdict. Raises ``ValueError`` when there is nothing to approximate.

    Args:
        attack: a gradient attack (FGSM, PGD, APGD, EOT, ...), not mutated.
        approximations: default None; overrides or extends the modules found: a mapping from a
            module (or its qualified name in ``model.named_modules()``) to a callable, or to None
            for the identity, or a list of names/modules approximated by the identity.
        functional: also approximate the torch functions above (default False).

    Shapes: ``x`` N x C x H x W in [0, 1], ``y`` int64 N, ``targets`` int64 N or None ->
    :class:`~unmask.bench.core.AttackResult` (its ``config`` lists the ``approximated`` modules
    and the number of ``straight_through_calls``).

    Usage: ``BPDA(PGD(Threat("linf", 0.3)))(quantised_model, x, y, generator=g)``, or for a model
    that calls ``torch.round`` in its forward:
    ``BPDA(PGD(Threat("linf", 0.3)), functional=True)(model, x, y, generator=g)``
    """

    name = "bpda"

    def __init__(self, attack: Attack,
                 approximations: Mapping | Sequence | None = None,
                 functional: bool = False) -> None:
        super().__init__(attack)
        self.approximations = approximations
        if not isinstance(functional, bool):
            raise TypeError(f"functional must be a bool, got {type(functional).__name__}")
        self.functional = functional

    def config(self):
        return {**self.attack.config(), "attack": self.label, "functional": self.functional}

    def run(self, model, x, y, *, targets=None, generator=None, oracle=None) -> AttackResult:
        hooked = find_preprocessing(model, self.approximations)
        if not hooked and not self.functional:
            raise ValueError(
                "BPDA found no preprocessing module to approximate: give the module a method "
                "bpda_approximation(x), pass approximations={'module.name': None} (identity), "
                "or functional=True for torch.round/floor/sign/... called inside forward")
        handles = []
        mode = StraightThroughMode() if self.functional else None

        def make_hook(fn):
            def hook(module, inputs, output):
                if not torch.is_grad_enabled():
                    return output
                approx = fn(inputs[0])
                return approx + (output - approx).detach()
            return hook

        try:
            for _, module, fn in hooked:
                handles.append(module.register_forward_hook(make_hook(fn)))
            kwargs = {"oracle": oracle} if oracle is not None else {}
            if mode is not None:
                with mode:
                    result = self.attack.run(model, x, y, targets=targets, generator=generator,
                                             **kwargs)
            else:
                result = self.attack.run(model, x, y, targets=targets, generator=generator,
                                         **kwargs)
        finally:
            for h in handles:
                h.remove()
        x, y = check_inputs(x, y, model=model)
        # The hooked forward is numerically the model's only up to rounding: the verdict on
        # every attacked sample comes from the model itself.
        attacked = (result.forwards > 1).nonzero().flatten()
        if result.expected_success is None and attacked.numel():
            ta = targets[attacked] if targets is not None else None
            with model_mode(model), torch.no_grad():
                result.margin[attacked] = margin(model(result.x_adv[attacked]), y[attacked], ta)
            result.forwards[attacked] += 1
            result.success = result.margin < 0
        result.name = self.name
        result.config = {**result.config, "attack": self.label,
                         "approximated": [name for name, _, _ in hooked],
                         "functional": self.functional,
                         "straight_through_calls": mode.calls if mode is not None else 0}
        return result
