"""The check registry (:data:`CHECKS`, a :class:`~unmask.bench.core.registry.Registry`): every
masking check is a function of a :class:`Context`, registered with :func:`check` together with
what it detects, its rule and thresholds, the evidence it records, the verdict a failure
implies and what it costs.

A check returns an :class:`Outcome` (value, pass/fail, evidence); the registry turns it into a
:class:`~.report.CheckResult` with the declared metadata and the forward/backward passes the
model served while the check ran (counted with hooks on the model itself). The shared work
(clean logits, input gradients, the reference PGD run) lives on the :class:`Context` and is
computed on first use, so a check run alone (:func:`run_check`) pays only for what it needs,
and run together the checks share it.

Adding a check::

    @check("my check", family="gradients", kind=MaskingKind.SHATTERED,
           severity=Verdict.SUSPICIOUS, source="Author et al. 2024",
           rule=f"some value > {MY_THRESHOLD}", thresholds=("MY_THRESHOLD",),
           evidence=("samples",), cost="one forward pass per correctly classified sample")
    def my_check(ctx: Context) -> Outcome:
        ...

The tests fail until the new check has a positive control (a model it must fail) and a
negative control (a model it must pass) in ``tests/test_masking_checks.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...attacks import PGD
from ...bench.core import Threat, check_inputs, check_logits, make_generator, margin, model_mode
from ...bench.core.registry import Registry
from .report import CheckResult, MaskingKind, Verdict

__all__ = ["Budget", "Context", "Outcome", "Check", "CHECKS", "FAMILIES", "check", "run_check",
           "run_checks"]

FAMILIES = ("outputs", "gradients", "attacks", "optimisation", "binarization")


@dataclass(frozen=True)
class Budget:
    """How much the checks may spend: PGD ``steps``, Square ``queries``, the samples the
    expensive checks run on, and the random draws of the noise search."""

    steps: int = 20
    queries: int = 1000
    square_samples: int = 100
    monotone_samples: int = 200
    noise_draws: int = 20
    binarization_samples: int = 16

    @classmethod
    def for_mode(cls, fast: bool) -> Budget:
        """``fast=True``: the CI budget (half the steps, a third of the queries)."""
        if fast:
            return cls(steps=10, queries=300, square_samples=40, monotone_samples=100,
                       noise_draws=10, binarization_samples=8)
        return cls()


@dataclass
class Outcome:
    """What a check function returns; ``rule``/``severity`` override the declared ones when a
    check's rule depends on the run (its budget) or its severity on the value."""

    value: float | None
    passed: bool
    evidence: dict[str, Any] = field(default_factory=dict)
    rule: str | None = None
    severity: Verdict | None = None
    skipped: str | None = None


@dataclass(frozen=True)
class Check:
    """A registered check. ``thresholds`` names the module constants its rule uses (each is
    commented with why its value); ``evidence`` the keys a firing result must carry; ``cost``
    says in words what it spends (the measured passes are on every result); ``needs_correct``:
    it runs on the correctly classified samples and is skipped when there are none."""

    name: str
    family: str
    kind: MaskingKind
    severity: Verdict
    source: str
    rule: str
    thresholds: tuple[str, ...]
    evidence: tuple[str, ...]
    cost: str
    fn: Callable[[Context], Outcome]
    needs_correct: bool = True
    module: str = ""

    def run(self, ctx: Context) -> CheckResult:
        """Run the check on ``ctx`` and return its :class:`CheckResult` with the passes it spent;
        skipped when it needs correctly classified samples and there are none.
        """
        if self.needs_correct and ctx.n_att == 0:
            out = Outcome(None, True, skipped="no correctly classified sample")
        else:
            with ctx.counting() as cost:
                out = self.fn(ctx)
        return CheckResult(self.name, out.value, out.rule or self.rule, bool(out.passed),
                           out.severity or self.severity, self.kind, self.source,
                           out.evidence, out.skipped,
                           None if out.skipped and self.needs_correct and ctx.n_att == 0
                           else dict(cost))


# The report's order: by family (cheap mechanism checks first), then registration.
CHECKS: Registry[Check] = Registry("masking check", order=lambda c: FAMILIES.index(c.family))


def check(name: str, *, family: str, kind: MaskingKind, severity: Verdict, source: str,
          rule: str, thresholds: tuple[str, ...] = (), evidence: tuple[str, ...] = (),
          cost: str, needs_correct: bool = True) -> Callable:
    """Register a check function under ``name`` (see the module docstring)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown check family {family!r}; expected one of {FAMILIES}")

    def register(fn: Callable[[Context], Outcome]) -> Callable[[Context], Outcome]:
        CHECKS.add(name, Check(name, family, kind, severity, source, rule, tuple(thresholds),
                               tuple(evidence), cost, fn, needs_correct, fn.__module__))
        return fn

    return register


@contextlib.contextmanager
def _count_autograd_calls():
    """Count autograd.grad/backward calls made while the block runs (e.g. inside forward)."""
    counts = {"calls": 0}
    orig_grad, orig_backward = torch.autograd.grad, torch.autograd.backward

    def grad(*a, **k):
        counts["calls"] += 1
        return orig_grad(*a, **k)

    def backward(*a, **k):
        counts["calls"] += 1
        return orig_backward(*a, **k)

    torch.autograd.grad, torch.autograd.backward = grad, backward
    try:
        yield counts
    finally:
        torch.autograd.grad, torch.autograd.backward = orig_grad, orig_backward


class Context:
    """Everything the checks share for one (model, samples, threat, budget).

    Computed on construction: two clean forward passes (``logits``, ``logits2``) with the
    autograd calls made inside them, which samples are correctly classified (``idx``; the
    other checks run on ``xc``, ``yc``). Computed on first use: input gradients (``grads``)
    and the reference PGD run (``pgd``). ``hits`` collects, per attack a check ran, which
    attacked samples it broke (for the row's per-sample worst case).
    """

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
                 budget: Budget | None = None, generator: torch.Generator | int | None = None,
                 surrogate: nn.Module | None = None,
                 adapt: Callable[[Any], Any] | None = None, view: nn.Module | None = None,
                 adaptive: str | None = None) -> None:
        if not isinstance(threat, Threat):
            raise TypeError(f"threat must be a Threat, got {type(threat).__name__}")
        x, y = check_inputs(x, y, model=model)
        self.model, self.x, self.y, self.threat = model, x, y, threat
        self.budget = budget or Budget()
        self.g = make_generator(0 if generator is None else generator)
        self.surrogate = surrogate
        # The white-box attacks run as ``adapt(attack)(view, ...)``: plain attacks on the
        # model by default; for the adaptive re-checks, the follow-up's adaptation (BPDA
        # around every gradient attack, or a scale-free view of saturated outputs).
        self.adapt = adapt or (lambda attack: attack)
        self.view = model if view is None else view
        self.adaptive = adaptive
        self.hits: dict[str, Tensor] = {}
        self._counters: list[dict[str, int]] = []
        with model_mode(model):
            with torch.no_grad(), _count_autograd_calls() as calls:
                logits = model(x)
                logits2 = model(x)
        # NaN or Inf logits are an error, never robustness (a NaN margin is "not broken").
        for out in (logits, logits2):
            check_logits(out, x.shape[0], probabilities="ignore", model=model, labels=y)
        self.logits, self.logits2, self.autograd_calls = logits, logits2, calls["calls"]
        self.correct = margin(logits, y) >= 0
        self.idx = self.correct.nonzero().flatten()
        self.xc, self.yc = x[self.idx], y[self.idx]

    @property
    def n_att(self) -> int:
        """The attacked samples: those the model classifies correctly."""
        return int(self.idx.numel())

    @property
    def steps(self) -> int:
        """PGD steps of the budget (the shared PGD run and the checks' own PGD runs)."""
        return self.budget.steps

    @cached_property
    def grads(self) -> tuple[Tensor, Tensor, bool]:
        """Per-sample CE and margin input gradients at ``xc`` and whether the graph is broken
        (then both are zero)."""
        xr = self.xc.detach().clone().requires_grad_(True)
        with model_mode(self.model), torch.enable_grad():
            logits = self.model(xr)
            if not logits.requires_grad:
                zero = torch.zeros_like(self.xc)
                return zero, zero, True
            ce = F.cross_entropy(logits, self.yc, reduction="sum")
            g_ce = torch.autograd.grad(ce, xr, retain_graph=True, allow_unused=True)[0]
            g_m = torch.autograd.grad(-margin(logits, self.yc).sum(), xr, allow_unused=True)[0]
        if g_ce is None or g_m is None:
            zero = torch.zeros_like(self.xc)
            return zero, zero, True
        return g_ce, g_m, False

    @cached_property
    def pgd(self):
        """The reference white-box attack: PGD-``steps`` (CE) on the attacked samples (adapted
        for the adaptive re-checks)."""
        return self.adapt(PGD(self.threat, steps=self.steps))(self.view, self.xc, self.yc,
                                                              generator=self.g)

    @property
    def pgd_broken(self) -> Tensor:
        """Bool per attacked sample: broken by the shared PGD run."""
        return self.pgd.success

    @property
    def survivors(self) -> Tensor:
        """Indices (into ``xc``) of the samples PGD left standing."""
        return (~self.pgd.success).nonzero().flatten()

    def record(self, attack: str, broken: Tensor) -> None:
        """Note which attacked samples ``attack`` broke (merged into the row's worst case)."""
        prev = self.hits.get(attack)
        self.hits[attack] = broken.clone() if prev is None else prev | broken

    @contextlib.contextmanager
    def counting(self):
        """Count the sample rows the model serves forward and backward inside the block."""
        counts = {"forward": 0, "backward": 0}
        self._counters.append(counts)

        def on_forward(module, inputs, out):
            rows = int(inputs[0].shape[0]) if inputs and isinstance(inputs[0], Tensor) else 0
            for c in self._counters:
                c["forward"] += rows
            if isinstance(out, Tensor) and out.requires_grad:
                live = list(self._counters)

                def on_backward(grad):
                    for c in live:
                        c["backward"] += rows
                out.register_hook(on_backward)

        handle = self.model.register_forward_hook(on_forward) if len(self._counters) == 1 else None
        try:
            yield counts
        finally:
            self._counters.remove(counts)
            if handle is not None:
                handle.remove()


def run_checks(ctx: Context, names: Iterable[str] | None = None) -> list[CheckResult]:
    """Run the registered checks (all, or ``names`` in registry order) on ``ctx``."""
    wanted = CHECKS.names() if names is None else list(names)
    unknown = [n for n in wanted if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown masking check(s) {unknown}; registered: {CHECKS.names()}")
    return [CHECKS.get(n).run(ctx) for n in CHECKS.names() if n in wanted]


def run_check(name: str, model: nn.Module, x: Tensor, y: Tensor, threat: Threat, *,
              fast: bool = True, generator: torch.Generator | int | None = 0,
              surrogate: nn.Module | None = None) -> CheckResult:
    """Run one registered check alone (it computes only the shared work it needs)."""
    if name not in CHECKS:
        raise ValueError(f"unknown masking check {name!r}; registered: {CHECKS.names()}")
    ctx = Context(model, x, y, threat, budget=Budget.for_mode(fast), generator=generator,
                  surrogate=surrogate)
    return CHECKS.get(name).run(ctx)
