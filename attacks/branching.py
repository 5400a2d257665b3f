"""Sub-modules as branches: find them by name, cut their gradient, or switch them off.

``detach_outputs`` lets no gradient through the given modules while leaving the forward pass
untouched (their outputs are detached): the tool behind :class:`~unmask.attacks.BranchPGD` and
:func:`unmask.explain.branch_attribution`. ``zero_outputs`` disables them (zero outputs).
Both are context managers whose forward hooks are removed on exit, also on error.

Usage: ``with detach_outputs([model.texture]): grad = ...``
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["resolve_modules", "detach_outputs", "zero_outputs"]


def resolve_modules(model: nn.Module, branches: Sequence[str | nn.Module]) -> dict[str, nn.Module]:
    """Map each branch (a qualified name or a sub-module of ``model``) to ``{name: module}``."""
    if isinstance(branches, (str, nn.Module)) or not isinstance(branches, Sequence):
        raise TypeError("branches must be a list of sub-modules or their qualified names")
    if not branches:
        raise ValueError("branches is empty; give at least one sub-module of the model")
    by_name = dict(model.named_modules())
    names = {id(m): n for n, m in by_name.items()}
    out: dict[str, nn.Module] = {}
    for b in branches:
        if isinstance(b, str):
            if b not in by_name or b == "":
                known = ", ".join(n for n in by_name if n) or "(none)"
                raise ValueError(f"no sub-module named {b!r} in the model; modules: {known}")
            name, module = b, by_name[b]
        elif isinstance(b, nn.Module) and id(b) in names and names[id(b)] != "":
            name, module = names[id(b)], b
        else:
            raise ValueError(f"branch {b!r} is not a sub-module of the model")
        if name in out:
            raise ValueError(f"branch {name!r} is listed twice")
        out[name] = module
    return out


def _map_tensors(fn, output):
    return tree_map(lambda t: fn(t) if isinstance(t, Tensor) else t, output)


@contextmanager
def _output_hooks(modules: Sequence[nn.Module], fn) -> Iterator[None]:
    handles = []
    try:
        for m in modules:
            handles.append(m.register_forward_hook(lambda _m, _a, out: _map_tensors(fn, out)))
        yield
    finally:
        for h in handles:
            h.remove()


def detach_outputs(modules: Sequence[nn.Module]):
    """Context manager: ``modules`` pass no gradient (their outputs are detached); forward
    values are unchanged. Hooks are removed on exit, also on error."""
    return _output_hooks(modules, lambda t: t.detach())


def zero_outputs(modules: Sequence[nn.Module]):
    """Context manager: ``modules`` are disabled (their outputs replaced by zeros)."""
    return _output_hooks(modules, torch.zeros_like)
