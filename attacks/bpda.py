"""BPDA: Backward Pass Differentiable Approximation (Athalye, Carlini & Wagner, ICML 2018).

Wraps any gradient attack. On the forward pass, non-differentiable preprocessing modules
(quantisation, JPEG, ...) run as they are; on the backward pass their gradient is that of a
differentiable approximation, the identity by default. Implemented with forward hooks that
return ``approx(x) + (f(x) - approx(x)).detach()``, removed when the attack returns or raises.

Modules declare their approximation with a method ``bpda_approximation(x)``; BPDA finds them
in the model. ``approximations`` overrides or extends that: a mapping from a module (or its
qualified name in ``model.named_modules()``) to a callable, or to None for the identity, or a
list of names/modules approximated by the identity.

Success is re-checked on the model without hooks, so ``success`` is exactly the true
model's verdict.

Usage: ``BPDA(PGD(Threat("linf", 0.3)))(quantised_model, x, y, generator=g)``
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..bench.core import AttackResult, check_inputs, margin, model_mode
from .base import Attack, register_attack

__all__ = ["BPDA", "find_preprocessing"]


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
class BPDA(Attack):
    name = "bpda"

    def __init__(self, attack: Attack,
                 approximations: Mapping | Sequence | None = None) -> None:
        if not isinstance(attack, Attack) or attack.gradient_free:
            raise TypeError("BPDA wraps a gradient attack (FGSM, PGD, APGD, EOT, ...), got "
                            f"{type(attack).__name__}")
        super().__init__(attack.threat)
        self.attack = attack
        self.approximations = approximations

    @property
    def label(self) -> str:
        return f"bpda-{self.attack.label}"

    def config(self):
        return {**self.attack.config(), "attack": self.label}

    def run(self, model, x, y, *, targets=None, generator=None, oracle=None) -> AttackResult:
        hooked = find_preprocessing(model, self.approximations)
        if not hooked:
            raise ValueError(
                "BPDA found no preprocessing module to approximate: give the module a method "
                "bpda_approximation(x), or pass approximations={'module.name': None} (identity)")
        handles = []

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
            result = self.attack.run(model, x, y, targets=targets, generator=generator, **kwargs)
        finally:
            for h in handles:
                h.remove()
        x, y = check_inputs(x, y)
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
                         "approximated": [name for name, _, _ in hooked]}
        return result
