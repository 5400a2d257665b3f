"""Hooks that record gradient statistics on every module of a model (used by
:func:`unmask.explain.audit`).

``with trace(model) as tracer:`` registers, on every module, a forward pre-hook that hands the
module a fresh view of each input (so the gradient of that view is this module's share of
the input gradient, not the sum over every consumer of the tensor) and a forward hook on its
outputs; tensor hooks then reduce each gradient to per-sample norms, zero and NaN/Inf counts
as the backward pass runs, so no gradient tensor is kept. A torch-function mode records the
functional calls (``F.relu``, ``+``) a container makes in its own forward, so they are
reported at the nearest hooked level. Everything is removed on exit, also on error;
in-place modules run out of place meanwhile (bit-identical values).

Usage::

    with trace(model) as tracer:
        tracer.begin(x.shape[0], x.device)
        loss(model(x)).backward()
    calls = tracer.passes[-1]   # {(module name, call index): record}
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["Tracer", "trace", "merge_calls"]

log = logging.getLogger(__name__)

# Functional calls that never change the gradient's magnitude profile and would only clutter
# the "functional" column of a container.
_QUIET_FUNCS = frozenset({
    "get", "size", "dim", "numel", "len", "shape", "is_floating_point", "stride", "type",
    "is_contiguous", "requires_grad_", "data_ptr", "ndimension", "bool", "repr", "format",
    "contiguous", "index", "getitem",
})


# Active = the unit's local derivative is non-zero; a unit inactive for every sample is dead.
def _active_relu(m: nn.Module, t: Tensor) -> Tensor:
    return t > 0


def _active_hardtanh(m: nn.Hardtanh, t: Tensor) -> Tensor:
    return (t > m.min_val) & (t < m.max_val)


def _active_leaky(m: nn.LeakyReLU, t: Tensor) -> Tensor:
    return t > 0 if m.negative_slope == 0 else torch.ones_like(t, dtype=torch.bool)


def _active_prelu(m: nn.PReLU, t: Tensor) -> Tensor:
    if bool((m.weight != 0).all()):
        return torch.ones_like(t, dtype=torch.bool)
    return t > 0


def _active_threshold(m: nn.Threshold, t: Tensor) -> Tensor:
    return t > m.threshold


def _active_hardswish(m: nn.Module, t: Tensor) -> Tensor:
    return t > -3


def _active_smooth(m: nn.Module, t: Tensor) -> Tensor:
    # ELU, GELU, SiLU, ...: the derivative is never exactly zero, no unit can die.
    return torch.ones_like(t, dtype=torch.bool)


_RELU_LIKE: tuple[tuple[type[nn.Module], Any], ...] = (
    (nn.ReLU, _active_relu),
    (nn.Hardtanh, _active_hardtanh),  # includes ReLU6
    (nn.LeakyReLU, _active_leaky),
    (nn.PReLU, _active_prelu),
    (nn.Threshold, _active_threshold),
    (nn.Hardswish, _active_hardswish),
    (nn.ELU, _active_smooth),
    (nn.CELU, _active_smooth),
    (nn.SELU, _active_smooth),
    (nn.GELU, _active_smooth),
    (nn.SiLU, _active_smooth),
    (nn.Mish, _active_smooth),
)


def _activity_fn(m: nn.Module):
    for cls, fn in _RELU_LIKE:
        if isinstance(m, cls):
            return fn
    return None


class _Side:
    """Gradient statistics of one side (input or output) of one module call."""

    __slots__ = ("sq", "zeros", "nans", "infs", "numel", "per_sample", "fired", "tensors",
                 "versions", "rewritten")

    def __init__(self, n: int, device: torch.device) -> None:
        self.sq = torch.zeros(n, dtype=torch.float64, device=device)
        self.zeros = torch.zeros((), dtype=torch.int64, device=device)
        self.nans = torch.zeros((), dtype=torch.int64, device=device)
        self.infs = torch.zeros((), dtype=torch.int64, device=device)
        self.numel = 0
        self.per_sample = True
        self.fired = 0
        self.tensors = 0  # tensors that carry a hook
        self.versions: list[tuple[Tensor, int]] = []
        self.rewritten = False  # a hooked tensor was modified in place after the hook

    def add(self, grad: Tensor, n: int) -> None:
        g = grad.detach()
        if g.dim() >= 1 and g.shape[0] == n:
            norms = torch.linalg.vector_norm(g.reshape(n, -1), dim=1).double()
            self.sq += norms.square()
        else:  # no batch dimension to split by: spread the batch-level norm evenly
            self.per_sample = False
            norms = torch.linalg.vector_norm(g).double()
            self.sq += norms.square() / n
        # count_nonzero, not (g == 0).sum(): summing a bool tensor costs more than the backward.
        self.zeros += g.numel() - torch.count_nonzero(g)
        if not bool(torch.isfinite(norms).all()):  # only then look for the NaN/Inf entries
            self.nans += torch.isnan(g).sum()
            self.infs += torch.isinf(g).sum()
        self.numel += g.numel()
        self.fired += 1


class _Call:
    """Everything recorded for one call of one module in one pass."""

    __slots__ = ("name", "kind", "call", "leaf", "end", "needs_in", "needs_out", "has_out",
                 "inp", "out", "active", "functional")

    def __init__(self, name: str, kind: str, call: int, leaf: bool, n: int, device) -> None:
        self.name, self.kind, self.call, self.leaf = name, kind, call, leaf
        self.end = -1
        self.needs_in = self.needs_out = self.has_out = False
        self.inp = _Side(n, device)
        self.out = _Side(n, device)
        self.active: Tensor | None = None
        self.functional: dict[str, None] = {}


class _FunctionalCalls(TorchFunctionMode):
    """Records the torch functions a container calls directly in its own forward."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        tr = self.tracer
        if tr.stack and not tr.busy:
            rec = tr.stack[-1][1]
            if not rec.leaf:
                name = getattr(func, "__name__", None) or type(func).__name__
                name = name.strip("_")
                if name not in _QUIET_FUNCS:
                    rec.functional.setdefault(name, None)
        return func(*args, **(kwargs or {}))


class Tracer:
    """Hooks on every module of a model that record gradient statistics; see :func:`trace`.

    Each forward pass is one ``pass``: call :meth:`begin` with the batch size before it, run
    the model and a backward, then :meth:`end`. Records accumulate over passes.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.names = {id(m): name for name, m in model.named_modules()}
        self.handles: list[Any] = []
        self.stack: list[tuple[nn.Module, _Call]] = []
        self.busy = False
        self.passes: list[dict[tuple[str, int], _Call]] = []
        self.order: dict[tuple[str, int], int] = {}
        self.watched: dict[str, _Call] = {}
        self._n = 0
        self._device: torch.device = torch.device("cpu")
        self._calls: dict[str, int] = {}
        self._end_counter = 0
        self._flipped: list[nn.Module] = []

    # - lifecycle -
    def install(self) -> None:
        """Hook every module of the model (forward pre-hooks and forward hooks); in-place modules
        are switched out of place until :meth:`remove`.
        """
        for m in self.model.modules():
            # In-place modules (ReLU(inplace=True)) would rewrite the view we hand them and so
            # hide their input gradient; out of place they compute bit-identical values.
            if getattr(m, "inplace", False) is True:
                m.inplace = False
                self._flipped.append(m)
            try:
                self.handles.append(m.register_forward_pre_hook(self._pre, with_kwargs=True))
                self.handles.append(m.register_forward_hook(self._post, with_kwargs=True))
            except RuntimeError as err:  # scripted modules do not take Python hooks
                log.debug("cannot hook %s: %s", self.names.get(id(m)), err)

    def remove(self) -> None:
        """Remove every hook and restore the in-place flags the tracer switched off."""
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for m in self._flipped:
            m.inplace = True
        self._flipped.clear()
        self.stack.clear()

    def begin(self, n: int, device: torch.device) -> None:
        """Start a new pass over a batch of ``n`` samples on ``device`` (call before the
        forward).
        """
        self._n, self._device = n, device
        self._calls = {}
        self.stack.clear()
        self.passes.append({})
        self.watched = {}

    # - hooks -
    def _record(self, module: nn.Module) -> _Call:
        name = self.names.get(id(module), type(module).__name__)
        call = self._calls.get(name, 0)
        self._calls[name] = call + 1
        leaf = next(iter(module.children()), None) is None
        rec = _Call(name, type(module).__name__, call, leaf, self._n, self._device)
        self.passes[-1][(name, call)] = rec
        return rec

    def _pre(self, module: nn.Module, args: tuple, kwargs: dict):
        if not self.passes:
            return None
        self.busy = True
        try:
            rec = self._record(module)
            act = _activity_fn(module) if rec.leaf else None
            if act is not None:
                first = next((a for a in args if isinstance(a, Tensor)), None)
                if first is not None and first.dim() >= 1 and first.shape[0] == self._n:
                    with torch.no_grad():
                        rec.active = act(module, first.detach()).reshape(self._n, -1).any(0)

            seen: dict[int, Tensor] = {}

            def alias(t: Any) -> Any:
                if isinstance(t, Tensor) and t.requires_grad and t.is_floating_point():
                    rec.needs_in = True
                    # The same tensor passed twice stays one object (attention checks
                    # `query is key` to pick its packed, differently rounded, projection).
                    if id(t) in seen:
                        return seen[id(t)]
                    # A fresh view per module: its gradient is this module's share of the
                    # input's gradient, not the sum over every consumer of the tensor.
                    a = t.view_as(t)
                    self._watch(a, rec.inp)
                    seen[id(t)] = a
                    return a
                return t

            new_args = tree_map(alias, args)
            new_kwargs = tree_map(alias, kwargs)
            self.stack.append((module, rec))
            return new_args, new_kwargs
        finally:
            self.busy = False

    def _post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        if not self.passes:
            return None
        self.busy = True
        try:
            while self.stack and self.stack[-1][0] is not module:
                self.stack.pop()  # a child that raised and was caught inside the forward
            if not self.stack:
                return None
            _, rec = self.stack.pop()
            self._end_counter += 1
            rec.end = self._end_counter
            key = (rec.name, rec.call)
            self.order.setdefault(key, rec.end)
            for t in tree_flatten(output)[0]:
                if isinstance(t, Tensor):
                    rec.has_out = True
                    if t.requires_grad and t.is_floating_point():
                        rec.needs_out = True
                        self._watch(t, rec.out)
            return None
        finally:
            self.busy = False

    def _watch(self, t: Tensor, side: _Side) -> None:
        n = self._n

        def hook(grad: Tensor) -> None:
            if grad is not None:
                side.add(grad, n)

        t.register_hook(hook)
        side.tensors += 1
        # A strong reference until check_inplace: the tensor a later in-place op rewrites is
        # often a temporary whose Python object is gone by the end of the forward.
        side.versions.append((t, t._version))

    def check_inplace(self) -> None:
        """Call after the forward pass: a hooked view that was later modified in place no
        longer leads to its pre-change gradient (its hook may never fire); mark it so the
        report says "not measured" instead of a false zero."""
        for rec in self.passes[-1].values():
            for side in (rec.inp, rec.out):
                side.rewritten |= any(t._version != v for t, v in side.versions)
                side.versions.clear()

    def watch(self, t: Tensor, name: str, side: str) -> None:
        """Record the gradient of a tensor outside the model (the input, the logits)."""
        rec = self.watched.get(name)
        if rec is None:
            rec = _Call(name, name.strip("<>"), 0, True, self._n, self._device)
            self.watched[name] = rec
            self.passes[-1][(name, 0)] = rec
        if side == "in":
            rec.needs_in = True
        self._watch(t, rec.inp if side == "in" else rec.out)


@contextmanager
def trace(model: nn.Module) -> Iterator[Tracer]:
    """Hook ``model`` for gradient-flow recording; every hook (and the functional-call mode)
    is removed on exit, also when the body raises. Does not change the model's mode."""
    tracer = Tracer(model)
    try:
        tracer.install()
        with _FunctionalCalls(tracer):
            yield tracer
    finally:
        tracer.remove()


def merge_calls(recs: list[_Call | None], n_per_pass: list[int]) -> dict[str, Any]:
    """Concatenate one call's records over passes (a pass that missed it counts as NaN)."""
    out: dict[str, Any] = {}
    for side in ("inp", "out"):
        sq, zeros, numel, nans, infs, fired, tensors, per_sample = [], 0, 0, 0, 0, 0, 0, True
        rewritten = False
        for rec, n in zip(recs, n_per_pass):
            if rec is None:
                sq.append(torch.full((n,), float("nan"), dtype=torch.float64))
                continue
            s: _Side = getattr(rec, side)
            sq.append(s.sq.cpu())
            zeros += int(s.zeros)
            nans += int(s.nans)
            infs += int(s.infs)
            numel += s.numel
            fired += s.fired
            tensors += s.tensors
            per_sample &= s.per_sample
            rewritten |= s.rewritten
        out[side] = dict(sq=torch.cat(sq), zeros=zeros, numel=numel, nans=nans, infs=infs,
                         fired=fired, tensors=tensors, per_sample=per_sample, rewritten=rewritten)
    present = [r for r in recs if r is not None]
    out["needs_in"] = any(r.needs_in for r in present)
    out["needs_out"] = any(r.needs_out for r in present)
    out["has_out"] = any(r.has_out for r in present)
    out["functional"] = tuple(dict.fromkeys(f for r in present for f in r.functional))
    actives = [r.active for r in present if r.active is not None]
    out["dead"] = None
    if actives and all(a.shape == actives[0].shape for a in actives):
        active = torch.stack(actives).any(0)
        out["dead"] = float((~active).float().mean()) if active.numel() else None
    return out
