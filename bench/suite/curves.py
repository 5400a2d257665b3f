"""Security curves: robust accuracy against eps, per model, from a per-sample minimum-eps search.

A security curve (Biggio & Roli 2018, "Wild patterns"; the ``robust accuracy vs eps`` plot of
RobustBench and ART) needs robust accuracy at many eps. One full cascade per eps costs the
whole ensemble again per point; here each sample is searched once, by bisection over an eps
grid, for the smallest grid eps at which an attack breaks it:

* the grid of a norm (:func:`curve_grid`) holds ``points`` eps evenly spaced up to the norm's
  largest suite eps, or the suite's explicit list, and always the suite's own eps;
* what the suite's cascade found at its own eps brackets each sample: broken at a suite eps
  ``e`` means broken at every eps >= ``e`` (its adversarial example lies in every larger
  ball), robust at ``e`` is taken as robust at every smaller eps;
* the remaining grid points between the bracket's ends are bisected with the search ensemble
  (default APGD-CE then APGD-T with 1 target, 40 steps each:
  :data:`unmask.bench.suite.spec.CURVE_ATTACKS`), so a sample costs about ``log2(points)`` attack
  runs, and a sample robust under the cascade at the largest eps costs nothing when the grid
  stops there (the default);
* ``broken_at`` of a sample is the smallest grid eps at which it was broken (0 when the clean
  input is misclassified; None when nothing broke it on the grid).

The curve at eps is the share of samples with ``broken_at > eps`` (:func:`curve_points`). It is
an **upper bound** on the true robust accuracy: a sample counts as broken only with an
adversarial example in hand. At report time it is capped per sample by the suite's row at each
of its eps (:func:`unmask.bench.report.curve_report.curves_frame`: the worst case over the ensemble, the masking diagnosis and
its follow-up, :func:`unmask.bench.report.leaderboard.row_outcomes`), so the curve never shows a model
more robust at a suite eps than the row does; it equals the row there unless the search broke a
sample the row's attacks did not (then the curve is lower, with the evidence).

Cost and tightness, measured on the default suite's 7 ranked models (100 mnist5k samples,
Linf up to 0.3, 10 points, 1 CPU thread): 105k forward and 98k backward passes in all (the
suite's cascade and diagnosis: 5 to 11 minutes on 2 cores). Against the full standard ensemble
(APGD-CE, APGD-T 9 targets, Square 5000) run at an intermediate eps on the same samples, the
curve reads mnist-cnn 0.56 vs 0.55 at 0.12, mnist-cnn-pgdat 0.91 vs 0.91 at 0.15,
mnist-cnn-gradreg 0.53 vs 0.50 at 0.18 and mnist-cnn-fastat 0.33 vs 0.32 at 0.24. With 20 steps
each (59k + 52k passes) fastat read 0.40 there; with 50 steps and 3 targets (239k forward
passes) 0.32.

Usage::

    search = min_eps_search(model, x, y, "linf", grid, attacks=build(threat_list), ...)
    # the report side (capping, CSV, figure): unmask.bench.report.curve_report
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...attacks import Ensemble
from ..core import DRAWS, Threat, make_generator
from .spec import build_attack

__all__ = ["curve_grid", "min_eps_search", "MinEpsResult", "curve_points", "curve_seed",
           "curve_selection", "search_for_suite"]

log = logging.getLogger(__name__)

def curve_grid(suite_eps: Sequence[float], *, points: int = 10,
               explicit: Sequence[float] | None = None) -> tuple[float, ...]:
    """The eps grid of one norm: ``points`` eps evenly spaced in ``(0, max(suite_eps)]`` (or
    ``explicit``), with every suite eps added; sorted, positive, without duplicates.

    >>> curve_grid([0.3], points=3)
    (0.1, 0.2, 0.3)
    """
    if isinstance(points, bool) or not isinstance(points, int) or points < 1:
        raise ValueError(f"points must be a positive int, got {points!r}")
    suite = [float(e) for e in suite_eps]
    if explicit is not None:
        base = [float(e) for e in explicit]
    else:
        top = max(suite, default=0.0)
        base = [round(top * (k + 1) / points, 12) for k in range(points)] if top > 0 else []
    grid = sorted({e for e in base + suite if e > 0 and math.isfinite(e)})
    if not grid:
        raise ValueError(f"the curve grid is empty (suite eps {suite}, explicit {explicit}); "
                         "give positive eps")
    return tuple(grid)


def curve_seed(seed: int, model: str, norm: str, round_: int, eps: float, chunk: int) -> int:
    """The generator seed of one search call: a function of its arguments only."""
    text = f"unmask-curve:{seed}:{model}:{norm}:{round_}:{eps!r}:{chunk}"
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@dataclass
class MinEpsResult:
    """The outcome of :func:`min_eps_search` for ``n`` samples.

    Attributes:
        grid: the eps grid (ascending).
        broken_at: per sample the smallest grid eps at which it was broken, 0.0 when the clean
            input is misclassified, None when nothing broke it on the grid.
        forwards, backwards: model passes the search spent (summed over samples).
        calls: the ensemble calls made (one per round and distinct eps, per batch chunk).
        seconds: wall time.
    """

    grid: tuple[float, ...]
    broken_at: list[float | None]
    forwards: int = 0
    backwards: int = 0
    calls: int = 0
    seconds: float = 0.0
    attacks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        """The number of samples."""
        return len(self.broken_at)

    def to_dict(self) -> dict[str, Any]:
        """The result as a JSON-ready dict: grid, per-sample ``broken_at``, costs, attacks."""
        return {"grid": list(self.grid), "broken_at": list(self.broken_at), "n": self.n,
                "forwards": self.forwards, "backwards": self.backwards, "calls": self.calls,
                "seconds": self.seconds, "attacks": self.attacks}


def _check_outcomes(name: str, outcomes: Mapping[float, Sequence[bool]] | None, n: int
                    ) -> dict[float, list[bool]]:
    out = {}
    for e, values in (outcomes or {}).items():
        values = [bool(v) for v in values]
        if len(values) != n:
            raise ValueError(f"{name}[{e:g}] has {len(values)} entries, expected one per sample "
                             f"({n})")
        out[float(e)] = values
    return out


def min_eps_search(model: nn.Module, x: Tensor, y: Tensor, norm: str,
                   grid: Sequence[float], *,
                   build: Callable[[Threat], Any],
                   clean_correct: Sequence[bool] | None = None,
                   broken: Mapping[float, Sequence[bool]] | None = None,
                   robust: Mapping[float, Sequence[bool]] | None = None,
                   seed: int = 0, batch_size: int = 256, label: str = "model"
                   ) -> MinEpsResult:
    """Per sample, the smallest eps of ``grid`` at which the ensemble ``build(threat)`` breaks
    it, by bisection over the grid (see the module docstring).

    Args:
        model: the model (``[0, 1]`` inputs, logits).
        x, y: ``N x C x H x W`` in [0, 1] and ``N`` labels.
        norm: ``"linf"`` or ``"l2"``.
        grid: ascending positive eps.
        build: ``threat -> Ensemble`` (an :class:`unmask.attacks.Ensemble`: its per-sample
            ``robust`` decides, so a randomised model is judged by majority over draws).
        clean_correct: per sample, whether the clean input is classified correctly (None:
            as the ensemble calls find it; a sample misclassified clean is never searched).
        broken: per eps (on the grid), the samples already known broken there (the suite's
            cascade): broken at every grid eps >= it.
        robust: per eps, the samples the cascade left robust: taken as robust at every grid
            eps <= it (they are not searched below it).
        seed: the search's seed (each call's generator: :func:`curve_seed`).
        batch_size: samples per ensemble call.
        label: the model's name (part of the seeds and the log).

    Returns: :class:`MinEpsResult`.
    """
    grid = tuple(float(e) for e in grid)
    if not grid or any(b <= a for a, b in zip(grid, grid[1:])) or grid[0] <= 0:
        raise ValueError(f"grid must be ascending positive eps, got {list(grid)}")
    if x.dim() != 4 or y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ValueError(f"expected x N x C x H x W and y N, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    n, k = int(x.shape[0]), len(grid)
    index = {e: i for i, e in enumerate(grid)}
    broken_m = _check_outcomes("broken", broken, n)
    robust_m = _check_outcomes("robust", robust, n)
    for e in [*broken_m, *robust_m]:
        if e not in index:
            raise ValueError(f"eps {e:g} of the known outcomes is not on the grid {list(grid)}")
    start = time.perf_counter()
    result = MinEpsResult(grid=grid, broken_at=[None] * n)
    clean = [True] * n  # without clean_correct: learnt from the ensemble calls below
    if clean_correct is not None:
        clean = [bool(c) for c in clean_correct]
        if len(clean) != n:
            raise ValueError(f"clean_correct has {len(clean)} entries, expected {n}")
    # Bracket per sample: lo = largest grid index taken as robust (-1: none), hi = smallest
    # grid index known broken (k: none). The points strictly between are searched.
    lo, hi = [-1] * n, [k] * n
    for e, values in broken_m.items():
        for i, b in enumerate(values):
            if b:
                hi[i] = min(hi[i], index[e])
    for e, values in robust_m.items():
        for i, r in enumerate(values):
            if r and index[e] < hi[i]:
                lo[i] = max(lo[i], index[e])
    round_ = 0
    while True:
        todo = [i for i in range(n) if clean[i] and hi[i] - lo[i] > 1]
        if not todo:
            break
        groups: dict[int, list[int]] = {}
        for i in todo:
            groups.setdefault((lo[i] + hi[i]) // 2, []).append(i)
        for mid, members in sorted(groups.items()):
            ensemble = build(Threat(norm, grid[mid]))
            if not result.attacks:
                result.attacks = [a.config() for a in getattr(ensemble, "attacks", [])]
            for c, s in enumerate(range(0, len(members), batch_size)):
                chunk = members[s:s + batch_size]
                idx = torch.tensor(chunk, device=x.device)
                g = make_generator(curve_seed(seed, label, norm, round_, grid[mid], c))
                res = ensemble(model, x[idx].clone(), y[idx].clone(), generator=g)
                result.calls += 1
                for cost in res.costs.values():
                    result.forwards += int(cost.forwards)
                    result.backwards += int(cost.backwards)
                for i, r, c in zip(chunk, res.robust.tolist(), res.clean_correct.tolist()):
                    if not c:  # misclassified clean (for a randomised model: by majority)
                        clean[i] = False
                        hi[i], lo[i] = 0, -1
                    elif r:
                        lo[i] = mid
                    else:
                        hi[i] = mid
        round_ += 1
    result.broken_at = [0.0 if not clean[i] else (grid[hi[i]] if hi[i] < k else None)
                        for i in range(n)]
    result.seconds = time.perf_counter() - start
    log.info("curve search of %s (%s): %d calls, %d rounds, %.1fs", label, norm, result.calls,
             round_, result.seconds)
    return result


def curve_points(broken_at: Sequence[float | None], grid: Sequence[float]
                 ) -> list[tuple[float, int]]:
    """``[(eps, robust count)]`` at eps 0 and every grid eps: a sample is robust at eps when
    ``broken_at`` is None or larger than eps. Non-increasing by construction."""
    out = []
    for e in [0.0, *grid]:
        out.append((float(e), sum(1 for b in broken_at if b is None or b > e)))
    return out


def curve_selection(models: Sequence[str], key: str, verdicts: Mapping[float, str | None]
                    ) -> tuple[bool, str, bool]:
    """Whether the suite's ``[curves] models`` selects model ``key`` at one norm, given its
    masking verdict at each suite eps of the norm (None: no finished diagnosis).

    ``"ranked"`` selects a model whose diagnosis finished at every eps with ``clean`` or
    ``suspicious`` (a ``masked`` model is left out even when ranked on an adaptive attack:
    a gradient search over eps would be as blind as the masking). Returns ``(selected, why
    not, final)``; ``final`` is False while a diagnosis is missing (a resumed run decides
    again)."""
    if "all" in models:
        return True, "", True
    if "ranked" not in models:
        return (key in models, "" if key in models else "not in [curves] models", True)
    missing = [e for e, v in verdicts.items() if v is None]
    if missing or not verdicts:
        return False, "no finished masking diagnosis, so not ranked", False
    masked = [e for e, v in verdicts.items() if v not in ("clean", "suspicious")]
    if masked:
        return False, f"masked at eps {', '.join(f'{e:g}' for e in sorted(masked))}", True
    return True, "", True


def search_for_suite(model: nn.Module, x: Tensor, y: Tensor, *, norm: str,
                     grid: Sequence[float], attacks: Sequence[Mapping[str, Any]],
                     cascade: Sequence[Mapping[str, Any]], seed: int, batch_size: int,
                     draws: int = DRAWS, precision: str = "fp32", label: str = "model"
                     ) -> MinEpsResult:
    """:func:`min_eps_search` as the suite runs it: the search ensemble from ``attacks``
    (``[attacks] list`` entries), the bracket from ``cascade`` (the suite's per-sample rows of
    this model and norm: ``eps``, ``sample``, ``clean_correct``, ``robust``)."""

    n = int(x.shape[0])
    broken: dict[float, list[bool]] = {}
    robust: dict[float, list[bool]] = {}
    clean: list[bool] | None = None
    by_eps: dict[float, list[Mapping[str, Any]]] = {}
    for row in cascade:
        by_eps.setdefault(float(row["eps"]), []).append(row)
    for e, rows_e in by_eps.items():
        rows_e = sorted(rows_e, key=lambda r: r["sample"])
        if [r["sample"] for r in rows_e] != list(range(n)):
            raise ValueError(f"the cascade's samples at {norm}:{e:g} are not the {n} samples "
                             "of the search")
        broken[e] = [bool(r["clean_correct"]) and not r["robust"] for r in rows_e]
        robust[e] = [bool(r["robust"]) for r in rows_e]
        clean = [bool(r["clean_correct"]) for r in rows_e]

    def build(threat: Threat):
        return Ensemble([build_attack(spec, threat) for spec in attacks], draws=draws,
                        precision=precision)

    return min_eps_search(model, x, y, norm, grid, build=build, clean_correct=clean,
                          broken=broken, robust=robust, seed=seed, batch_size=batch_size,
                          label=label)
