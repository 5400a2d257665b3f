"""Compare two runs: per model and threat, the change in robust accuracy and whether it is real.

Each row's robust accuracy is the leaderboard's one number (per sample the worst case over the
ensemble, the masking diagnosis and its follow-up: :func:`unmask.bench.report.check.baseline_from_store`
reads it per sample). When both runs evaluated the same samples (same ids and labels) the
comparison is **paired**: the samples robust in run A and broken in run B (*newly broken*)
against those broken in A and robust in B (*newly robust*), with the exact two-sided McNemar
test (:func:`unmask.bench.report.check.mcnemar`, the binomial test of the discordant pairs at p = 1/2).
Paired, 10 newly broken against 1 newly robust at n = 40 is p = 0.012, a real drop, where
two independent 95% intervals overlap.

When the samples differ (another ``n``, split or dataset) the outcomes cannot be paired: the
row says so and falls back to the unpaired 95% Newcombe interval of the difference of two
independent proportions (:func:`unmask.bench.report.check.newcombe`), labelled ``unpaired``.

The verdict word of a row: ``significant drop`` / ``significant rise`` (p < ``alpha``, or the
unpaired interval excludes 0) or ``no significant change``. Rows of one run only are listed
apart; a changed model fingerprint or suite configuration is a note (the comparison is what
the user asked for, the note says what else changed).

Usage::

    with Store("results/unmask.sqlite", readonly=True) as st:
        result = compare_runs(st, 3, st, 4)
        for row in result.rows:
            print(row.model, row.threat, row.difference, row.p_value, row.verdict)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..core.threat import threat_key
from ..suite.store import WORST_CASE, Store
from .check import ALPHA, baseline_from_store, mcnemar, newcombe

__all__ = ["RowChange", "RunComparison", "compare_runs", "VERDICTS", "DROP", "RISE",
           "NO_CHANGE"]

DROP, RISE, NO_CHANGE = "significant drop", "significant rise", "no significant change"
VERDICTS = (DROP, RISE, NO_CHANGE)


@dataclass
class RowChange:
    """One model x threat in both runs.

    ``difference`` is B - A (robust accuracy, a share). Paired rows fill ``newly_broken`` /
    ``newly_robust`` (counts, with the sample ids in ``*_ids``) and ``p_value`` (exact
    two-sided McNemar); unpaired rows fill ``low``/``high`` (the 95% Newcombe interval of
    B - A) and leave ``p_value`` None."""

    model: str
    threat: str
    norm: str
    eps: float
    n_a: int
    n_b: int
    robust_a: float
    robust_b: float
    difference: float
    paired: bool
    verdict: str
    p_value: float | None = None
    newly_broken: int | None = None
    newly_robust: int | None = None
    newly_broken_ids: list[int] = field(default_factory=list)
    newly_robust_ids: list[int] = field(default_factory=list)
    low: float | None = None
    high: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def test(self) -> str:
        """The statistical test the row used, in words."""
        return "paired McNemar (exact)" if self.paired else "unpaired 95% Newcombe interval"

    def to_dict(self) -> dict[str, Any]:
        """The row as a JSON-ready dict, with the test's name."""
        return {**asdict(self), "test": self.test}


@dataclass
class RunComparison:
    """The outcome of :func:`compare_runs`: a :class:`RowChange` per row in both runs, the
    rows of one run only, and run-wide notes."""

    run_a: int
    run_b: int
    alpha: float
    rows: list[RowChange] = field(default_factory=list)
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The comparison as a JSON-ready dict."""
        return {"run_a": self.run_a, "run_b": self.run_b, "alpha": self.alpha,
                "rows": [r.to_dict() for r in self.rows], "only_a": list(self.only_a),
                "only_b": list(self.only_b), "notes": list(self.notes)}


def _worst_cells(baseline: dict[str, Any]) -> dict[tuple[str, str, float], dict[str, Any]]:
    return {(c["model"], c["norm"], float(c["eps"])): c for c in baseline["cells"]
            if c["attack"] == WORST_CASE}


def _verdict(significant: bool, difference: float) -> str:
    if not significant:
        return NO_CHANGE
    return DROP if difference < 0 else RISE


def compare_runs(store_a: Store, run_a: int, store_b: Store | None = None,
                 run_b: int | None = None, *, alpha: float = ALPHA) -> RunComparison:
    """Compare run ``run_a`` of ``store_a`` with run ``run_b`` of ``store_b`` (default: the
    same store) row by row; see the module docstring.

    Args:
        alpha: the significance level of the verdict words (default 0.05, two-sided).

    Raises:
        ValueError: an unknown run, or ``alpha`` outside (0, 1).
    """
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ValueError(f"alpha must be a significance level in (0, 1), got {alpha!r}")
    if run_b is None:
        raise ValueError("give the second run (run_b)")
    store_b = store_a if store_b is None else store_b
    a, b = baseline_from_store(store_a, run_a), baseline_from_store(store_b, run_b)
    result = RunComparison(run_a=run_a, run_b=run_b, alpha=float(alpha))
    if a.get("config_hash") != b.get("config_hash"):
        result.notes.append(
            f"the suite configurations differ (run {run_a}: {a.get('suite')}"
            f"{', quick' if a.get('quick') else ''}, {a.get('config_hash')}; run {run_b}: "
            f"{b.get('suite')}{', quick' if b.get('quick') else ''}, {b.get('config_hash')}): "
            "a change may come from the evaluation, not the model")
    if a.get("versions") != b.get("versions"):
        result.notes.append("the library versions differ between the runs")
    cells_a, cells_b = _worst_cells(a), _worst_cells(b)
    for key in sorted(set(cells_a) | set(cells_b), key=lambda k: (k[1], k[2], k[0])):
        model, norm, eps = key
        threat = threat_key(norm, eps)
        ca, cb = cells_a.get(key), cells_b.get(key)
        if ca is None or cb is None:
            (result.only_b if ca is None else result.only_a).append(f"{model} {threat}")
            continue
        notes = []
        fa, fb = ca.get("fingerprint"), cb.get("fingerprint")
        if fa and fb and fa != fb:
            notes.append(f"model fingerprint changed ({fa[:12]} -> {fb[:12]})")
        sa, sb = ca.get("samples"), cb.get("samples")
        ra, rb = ca["robust"] / ca["n"], cb["robust"] / cb["n"]
        same = bool(sa and sb and sa["ids"] == sb["ids"] and sa.get("labels") == sb.get("labels"))
        if same:
            ids = sa["ids"]
            broken = [i for i, x, y in zip(ids, sa["robust"], sb["robust"]) if x and not y]
            fixed = [i for i, x, y in zip(ids, sa["robust"], sb["robust"]) if y and not x]
            p = mcnemar(len(broken), len(fixed))
            d = (len(fixed) - len(broken)) / len(ids)
            result.rows.append(RowChange(
                model, threat, norm, eps, ca["n"], cb["n"], ra, rb, d, True,
                _verdict(p < alpha, d), p_value=p, newly_broken=len(broken),
                newly_robust=len(fixed), newly_broken_ids=broken, newly_robust_ids=fixed,
                notes=notes))
            continue
        if sa and sb:
            notes.append(f"not the same samples (run {run_a}: {len(sa['ids'])}, run {run_b}: "
                         f"{len(sb['ids'])}; ids or labels differ): cannot pair, compared "
                         "unpaired")
        else:
            notes.append("no per-sample outcomes in one of the runs: compared unpaired")
        d, low, high = newcombe(cb["robust"], cb["n"], ca["robust"], ca["n"])
        if alpha != ALPHA:
            notes.append(f"the unpaired interval is 95% whatever alpha ({alpha:g})")
        result.rows.append(RowChange(
            model, threat, norm, eps, ca["n"], cb["n"], ra, rb, d, False,
            _verdict(high < 0 or low > 0, d), low=low, high=high, notes=notes))
    return result
