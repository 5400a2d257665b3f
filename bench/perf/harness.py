"""Attack throughput measured against the model's own speed, in one process.

An attack step costs one forward and one backward pass; that is the physical limit. This
module measures, on the same model object and inputs:

* ``R_fb``: images per second for one forward + backward w.r.t. the input (parameters frozen);
* ``R_f``: forward-only images per second;
* each attack's executed gradient (or, for score-based attacks, forward) evaluations per
  second, and its efficiency ``evals/s / R_fb`` (``/ R_f`` for Square);
* its effective speed ``nominal steps x samples / wall time / R_fb``, which early exit of
  broken samples can push above 1, next to the robust accuracy it reached.

Reference and attack blocks are interleaved over ``repeats`` rounds; medians and the
spread (min..max) are reported with device, threads, dtype and versions.

A faster variant of the model (``Autocast(model, "bf16")``, ``torch.compile(model)``) is
measured as the model itself, so efficiency stays a ratio to its own speed; pass the original
as ``judge`` and each attack's robust accuracy is that of the original model on the returned
``x_adv``, so a precision change that weakens the search shows in the table.

Usage: ``report = measure(model, x, y, {"pgd": PGD(threat, steps=10)}); print(report.table())``
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core import margin, model_mode
from ..zoo.registry import versions

__all__ = ["measure", "PerfReport", "AttackPerf", "reference_rates", "nominal_evaluations"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - start, out


def _forward_backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    xr = x.detach().requires_grad_(True)
    loss = F.cross_entropy(model(xr), y, reduction="sum")
    torch.autograd.grad(loss, xr)


def reference_rates(model: nn.Module, x: Tensor, y: Tensor, iters: int = 10) -> tuple[float, float]:
    """(R_fb, R_f) in images per second, parameters frozen, eval mode."""
    with model_mode(model):
        _forward_backward(model, x, y)  # warm-up
        t_fb, _ = _timed(lambda: [_forward_backward(model, x, y) for _ in range(iters)], x.device)
        with torch.no_grad():
            model(x)
            t_f, _ = _timed(lambda: [model(x) for _ in range(iters)], x.device)
    n = x.shape[0] * iters
    return n / t_fb, n / t_f


def nominal_evaluations(attack, n: int) -> tuple[int, str]:
    """(evaluations without early exit, 'gradient' or 'forward') for an attack on n samples."""
    cfg = attack.config()
    if getattr(attack, "gradient_free", False) and "queries" in cfg:
        return cfg["queries"] * n, "forward"
    steps = cfg.get("steps", 1)
    restarts = cfg.get("restarts", 1)
    targets = cfg.get("n_targets", 1)
    samples = cfg.get("eot_samples", 1)
    return steps * restarts * targets * samples * n, "gradient"


@dataclass
class AttackPerf:
    """One attack's measured throughput: ``kind`` ``"gradient"`` or ``"forward"``, wall
    ``seconds`` per repeat, the ``evaluations`` it executed, the ``nominal`` count without early
    exit, the robust accuracy it reached, and its cost: ``forwards`` and ``backwards`` passes
    over its ``n`` samples.
    """
    name: str
    kind: str  # "gradient" or "forward"
    seconds: list[float]
    evaluations: int
    nominal: int
    robust_accuracy: float
    forwards: int = 0
    backwards: int = 0
    n: int = 0

    @property
    def passes_per_sample(self) -> float:
        """Forward + backward passes per sample (0.0 when ``n`` is unknown)."""
        return (self.forwards + self.backwards) / self.n if self.n else 0.0

    @property
    def median_seconds(self) -> float:
        """Median wall time over the repeats."""
        return statistics.median(self.seconds)

    def rate(self) -> float:
        """Executed evaluations per second (at the median time)."""
        return self.evaluations / self.median_seconds


@dataclass
class PerfReport:
    """Result of :func:`measure`: the reference rates ``r_fb`` (forward + backward images/s) and
    ``r_f`` (forward-only) per repeat, one :class:`AttackPerf` per attack, the batch size and the
    environment (device, threads, dtype, versions).
    """
    r_fb: list[float]
    r_f: list[float]
    attacks: list[AttackPerf]
    batch: int
    environment: dict[str, Any] = field(default_factory=dict)

    @property
    def R_fb(self) -> float:  # noqa: N802 - the name used in the docs
        """Median forward + backward images per second: the gradient attacks' physical limit."""
        return statistics.median(self.r_fb)

    @property
    def R_f(self) -> float:  # noqa: N802
        """Median forward-only images per second: the score-based attacks' limit."""
        return statistics.median(self.r_f)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per attack: median/min/max seconds, evaluations per second, efficiency (ratio
        to ``R_fb``, or ``R_f`` for forward attacks), effective speed, robust accuracy.
        """
        out = []
        for a in self.attacks:
            ref = self.R_f if a.kind == "forward" else self.R_fb
            out.append({
                "attack": a.name, "kind": a.kind, "seconds": a.median_seconds,
                "seconds_min": min(a.seconds), "seconds_max": max(a.seconds),
                "evaluations": a.evaluations, "evals_per_s": a.rate(),
                "efficiency": a.rate() / ref,
                "effective_speed": a.nominal / a.median_seconds / ref,
                "robust_accuracy": a.robust_accuracy,
                "forwards": a.forwards, "backwards": a.backwards,
                "passes_per_sample": a.passes_per_sample,
            })
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict (reference rates with their ranges, rows,
        environment).
        """
        return {"R_fb": self.R_fb, "R_fb_range": [min(self.r_fb), max(self.r_fb)],
                "R_f": self.R_f, "R_f_range": [min(self.r_f), max(self.r_f)],
                "batch": self.batch, "attacks": self.rows(), "environment": self.environment}

    def to_json(self) -> str:
        """The report as indented JSON (:meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        """The report as a plain-text table, one line per attack."""
        lines = [f"R_fb {self.R_fb:,.0f} img/s (range {min(self.r_fb):,.0f}..{max(self.r_fb):,.0f}),"
                 f" R_f {self.R_f:,.0f} img/s, batch {self.batch}, "
                 f"{self.environment.get('device')} x{self.environment.get('threads')} threads",
                 f"{'attack':<22}{'evals/s':>12}{'efficiency':>12}{'effective':>11}"
                 f"{'robust acc':>12}{'seconds':>10}{'passes/sample':>15}"]
        for r in self.rows():
            lines.append(f"{r['attack']:<22}{r['evals_per_s']:>12,.0f}{r['efficiency']:>12.3f}"
                         f"{r['effective_speed']:>11.2f}{r['robust_accuracy']:>12.3f}"
                         f"{r['seconds']:>10.2f}{r['passes_per_sample']:>15,.1f}")
        return "\n".join(lines)


def measure(model: nn.Module, x: Tensor, y: Tensor, attacks: Mapping[str, Any], *,
            repeats: int = 5, ref_iters: int = 10, seed: int = 0,
            judge: nn.Module | None = None, environment: Mapping[str, Any] | None = None,
            ) -> PerfReport:
    """Interleave reference and attack timings over ``repeats`` rounds (see module doc).

    ``judge``: the model whose verdict on each ``x_adv`` gives the robust accuracy (default:
    the attack's own); ``environment``: extra facts for the report (precision, compile)."""

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    r_fb, r_f = [], []
    times: dict[str, list[float]] = {name: [] for name in attacks}
    results: dict[str, Any] = {}
    for attack in attacks.values():  # warm-up round, not timed
        attack(model, x, y, generator=torch.Generator().manual_seed(seed))
    for _ in range(repeats):
        fb, f = reference_rates(model, x, y, iters=ref_iters)
        r_fb.append(fb)
        r_f.append(f)
        for name, attack in attacks.items():
            g = torch.Generator().manual_seed(seed)
            seconds, res = _timed(lambda a=attack, g=g: a(model, x, y, generator=g), x.device)
            times[name].append(seconds)
            results[name] = res
    perf = []
    for name, attack in attacks.items():
        res = results[name]
        nominal, kind = nominal_evaluations(attack, x.shape[0])
        evals = res.n_forward if kind == "forward" else res.n_backward
        robust = res.robust_accuracy
        if judge is not None:
            with model_mode(judge), torch.no_grad():
                robust = float((margin(judge(res.x_adv), y) >= 0).float().mean())
        perf.append(AttackPerf(name, kind, times[name], evals, nominal, robust,
                               res.n_forward, res.n_backward, x.shape[0]))
    env = {"device": str(x.device), "threads": torch.get_num_threads(), "dtype": str(x.dtype),
           "channels_last": any(p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)
                                and not p.is_contiguous() for p in model.parameters()),
           "versions": versions(), **(environment or {})}
    if x.device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(x.device)
    return PerfReport(r_fb, r_f, perf, x.shape[0], env)
