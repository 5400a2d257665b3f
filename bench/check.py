"""Regression checks on robustness numbers: a run against a baseline, within statistical
tolerance.

A baseline is a JSON file (``results/baselines/default.json``) holding, per model x threat x
attack, the sample count and the clean and robust counts of a reference run, the per-sample
outcomes of the worst case (which samples were classified correctly and which survived), the
model's fingerprint, plus each masking verdict. :func:`compare` tests the baseline against
the current run on the SAME samples, paired: per row, the samples that were robust in the
baseline and are broken now (``newly broken``) against those broken then and robust now
(``newly robust``), with an exact McNemar test (a two-sided binomial test on the discordant
samples). A row fails on a significant drop (p < 0.05 and more newly broken than newly
robust) or on a drop larger than ``tolerance`` (5 points by default), and names the newly
broken samples. Paired, a drop of 8 points with 16 newly broken samples and none fixed fails at
n = 200 (p = 3e-5), where comparing the two runs as independent samples let it pass.
A changed checkpoint fingerprint or sample count is reported and fails unless
``allow_changed``. Baselines written before per-sample outcomes were recorded (schema 1) are
compared the old way (the Newcombe interval of two independent proportions), with a note.
A masking verdict that gets worse (``clean`` -> ``suspicious`` -> ``masked``) fails too.

Usage::

    baseline = read_baseline(Path("results/baselines/default.json"))
    result = compare(baseline, baseline_from_store(store, run_id))
    assert result.passed, format_result(result)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .store import WORST_CASE, Store, wilson

__all__ = ["BASELINE_SCHEMA", "baseline_from_store", "write_baseline", "read_baseline",
           "compare", "CheckResult", "Difference", "newcombe", "mcnemar", "format_result",
           "TOLERANCE"]

BASELINE_SCHEMA = 2
# A drop larger than this fails even when the McNemar test cannot call it significant (a
# small n): 5 points is the smallest difference the default suite's tables are read for.
TOLERANCE = 0.05
ALPHA = 0.05


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs."""
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)
_VERDICT_ORDER = {"clean": 0, "suspicious": 1, "masked": 2}


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """``(difference, low, high)``: the 95% hybrid score interval of ``k1/n1 - k2/n2``."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, low, high


def baseline_from_store(store: Store, run_id: int) -> dict[str, Any]:
    """The numbers of run ``run_id`` in baseline form."""
    run = store.run(run_id)
    from .leaderboard import _parse_report, row_outcomes

    per_sample: dict[tuple, list[dict[str, Any]]] = {}
    for s in store.rows("samples", run_id):
        per_sample.setdefault((s["model"], s["norm"], float(s["eps"])), []).append(s)
    reports = {(m["model"], m["norm"], float(m["eps"])): m for m in store.rows("masking", run_id)}
    cells = []
    for c in store.rows("cells", run_id):
        cell = {k: c[k] for k in ("model", "norm", "eps", "attack", "n", "clean_correct",
                                  "robust", "clean_accuracy", "robust_accuracy", "ci_low",
                                  "ci_high", "checkpoint_sha256")}
        rows = per_sample.get((c["model"], c["norm"], float(c["eps"])))
        if c["attack"] == WORST_CASE and rows:
            rows = sorted(rows, key=lambda r: r["sample"])
            # The row's one number: the worst case over the ensemble AND the diagnosis and its
            # follow-up, as the leaderboard reports it.
            key = (c["model"], c["norm"], float(c["eps"]))
            merged, _ = row_outcomes(rows, _parse_report(reports.get(key)))
            robust = [int(b is None) for b in merged.broken_by]
            cell["samples"] = {"ids": [r["sample"] for r in rows],
                               "clean_correct": [int(r["clean_correct"]) for r in rows],
                               "robust": robust}
            cell["robust"] = sum(robust)
            cell["robust_accuracy"] = sum(robust) / len(robust)
            cell["ci_low"], cell["ci_high"] = wilson(sum(robust), len(robust))
        cells.append(cell)
    masking = [{k: m[k] for k in ("model", "norm", "eps", "verdict")}
               for m in store.rows("masking", run_id)]
    return {"schema": BASELINE_SCHEMA, "kind": "unmask-baseline", "suite": run.suite,
            "run_id": run_id, "status": run.status, "quick": run.quick, "seed": run.seed,
            "config_hash": run.config_hash, "git_commit": run.git_commit,
            "versions": run.versions, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cells": cells, "masking": masking}


def write_baseline(baseline: dict[str, Any], path: Path) -> Path:
    """Write ``baseline`` atomically as indented JSON."""
    from .fileio import atomic_write as _atomic_write

    _atomic_write(Path(path), (json.dumps(baseline, indent=2, sort_keys=True) + "\n").encode())
    return Path(path)


def read_baseline(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"baseline {path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "unmask-baseline":
        raise ValueError(f"{path} is not an unmask baseline (write one with unmask check "
                         f"--baseline {path} --write)")
    if doc.get("schema", 0) > BASELINE_SCHEMA:
        raise ValueError(f"baseline {path} has schema {doc.get('schema')}, newer than this "
                         f"unmask reads ({BASELINE_SCHEMA})")
    return doc


@dataclass
class Difference:
    """One compared number."""

    model: str
    threat: str
    attack: str
    quantity: str  # clean_accuracy | robust_accuracy | masking
    baseline: Any
    current: Any
    difference: float | None = None
    low: float | None = None
    high: float | None = None
    failed: bool = False
    note: str = ""


@dataclass
class CheckResult:
    """The outcome of :func:`compare`: every compared number, what is missing and new."""

    differences: list[Difference] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Difference]:
        return [d for d in self.differences if d.failed]

    @property
    def passed(self) -> bool:
        return not self.failures and not self.missing


def _key(c: dict[str, Any]) -> tuple[str, str, float, str]:
    return (c["model"], c["norm"], float(c["eps"]), c["attack"])


def _paired(base: list[int], cur: list[int], ids: list[int], tolerance: float
            ) -> tuple[float, float, bool, str]:
    """``(difference, p, failed, note)`` of two per-sample 0/1 outcome lists on the same ids."""
    newly_broken = [i for i, b, c in zip(ids, base, cur) if b and not c]
    newly_robust = [i for i, b, c in zip(ids, base, cur) if c and not b]
    n = len(ids)
    d = (len(newly_robust) - len(newly_broken)) / n
    p = mcnemar(len(newly_broken), len(newly_robust))
    significant = p < ALPHA and len(newly_broken) > len(newly_robust)
    failed = significant or -d > tolerance
    note = (f"{len(newly_broken)} newly broken, {len(newly_robust)} newly robust, "
            f"McNemar p = {p:.2g}")
    if newly_broken:
        note += f"; newly broken: {', '.join(map(str, newly_broken[:20]))}" + \
            (" ..." if len(newly_broken) > 20 else "")
    if failed:
        note = ("significant drop; " if significant else
                f"drop beyond {tolerance:.0%} tolerance; ") + note
    return d, p, failed, note


def compare(baseline: dict[str, Any], current: dict[str, Any], *, only_drops: bool = False,
            all_attacks: bool = False, tolerance: float = TOLERANCE,
            allow_changed: bool = False) -> CheckResult:
    """Compare ``current`` with ``baseline`` (both in baseline form, see
    :func:`baseline_from_store`): paired per sample where both record the outcomes."""
    result = CheckResult()
    if baseline.get("config_hash") and current.get("config_hash") \
            and baseline["config_hash"] != current["config_hash"]:
        result.notes.append(
            f"the run's suite configuration ({current.get('suite')}"
            f"{', quick' if current.get('quick') else ''}) differs from the baseline's "
            f"({baseline.get('suite')}{', quick' if baseline.get('quick') else ''}): "
            "differences may come from the configuration, not the model")
    cur = {_key(c): c for c in current["cells"]}
    base_keys = set()
    for b in baseline["cells"]:
        if not all_attacks and b["attack"] != WORST_CASE:
            continue
        key = _key(b)
        base_keys.add(key)
        threat = f"{b['norm']}:{float(b['eps']):g}"
        c = cur.get(key)
        if c is None:
            result.missing.append(f"{b['model']} {threat} {b['attack']}")
            continue
        quantities = [("robust_accuracy", "robust")]
        if b["attack"] == WORST_CASE:
            quantities.insert(0, ("clean_accuracy", "clean_correct"))
        fb, fc = b.get("checkpoint_sha256"), c.get("checkpoint_sha256")
        if fb and fc and fb != fc:
            result.differences.append(Difference(
                b["model"], threat, b["attack"], "fingerprint", fb[:12], fc[:12],
                failed=not allow_changed,
                note="the model changed" + (" (allowed)" if allow_changed else
                                            "; --allow-changed to compare anyway")))
        sb, sc = b.get("samples"), c.get("samples")
        if sb and sc and sb["ids"] == sc["ids"]:
            for quantity, count in quantities:
                d, p, failed, note = _paired(sb[count], sc[count], sb["ids"], tolerance)
                rose = d > 0 and p < ALPHA
                failed = failed or (rose and not only_drops)
                if rose:
                    note = "rose significantly" + (" (allowed)" if only_drops else "") + \
                        "; " + note
                result.differences.append(Difference(
                    b["model"], threat, b["attack"], quantity, b[count] / b["n"],
                    c[count] / c["n"], d, None, None, failed, note))
            continue
        if sb and sc:
            result.differences.append(Difference(
                b["model"], threat, b["attack"], "samples", len(sb["ids"]), len(sc["ids"]),
                failed=not allow_changed, note="not the same samples: cannot pair"))
        elif b["attack"] == WORST_CASE and not sb:
            result.notes.append(f"{b['model']} {threat}: the baseline has no per-sample "
                                "outcomes (an older baseline): compared unpaired; rewrite it "
                                "with --write to compare paired")
        for quantity, count in quantities:
            d, low, high = newcombe(c[count], c["n"], b[count], b["n"])
            failed = high < 0 or (low > 0 and not only_drops)
            note = ""
            if high < 0:
                note = "dropped beyond tolerance"
            elif low > 0:
                note = "rose beyond tolerance" + ("" if not only_drops else " (allowed)")
            result.differences.append(Difference(
                b["model"], threat, b["attack"], quantity, b[count] / b["n"], c[count] / c["n"],
                d, low, high, failed, note))
    for key in cur:
        if key not in base_keys and (all_attacks or key[3] == WORST_CASE):
            result.extra.append(f"{key[0]} {key[1]}:{key[2]:g} {key[3]}")
    cur_mask = {(m["model"], m["norm"], float(m["eps"])): m["verdict"]
                for m in current.get("masking", [])}
    for m in baseline.get("masking", []):
        key = (m["model"], m["norm"], float(m["eps"]))
        threat = f"{m['norm']}:{float(m['eps']):g}"
        now = cur_mask.get(key)
        if now is None:
            result.missing.append(f"{m['model']} {threat} masking verdict")
            continue
        worse = _VERDICT_ORDER.get(now, 3) > _VERDICT_ORDER.get(m["verdict"], 3)
        if now != m["verdict"]:
            result.differences.append(Difference(
                m["model"], threat, "-", "masking", m["verdict"], now, failed=worse,
                note="verdict got worse" if worse else "verdict improved"))
    return result


def format_result(result: CheckResult) -> str:
    """A readable report: failures first, then every compared number."""
    from .cli import _table

    lines = []
    fails = result.failures
    status = "PASSED" if result.passed else "FAILED"
    lines.append(f"unmask check {status}: {len(result.differences)} numbers compared, "
                 f"{len(fails)} beyond tolerance, {len(result.missing)} missing")

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    def row(d: Difference) -> tuple:
        interval = "" if d.low is None else f"[{d.low:+.4f}, {d.high:+.4f}]"
        diff = "" if d.difference is None else f"{d.difference:+.4f}"
        return (("FAIL" if d.failed else "ok"), d.model, d.threat, d.attack, d.quantity,
                fmt(d.baseline), fmt(d.current), diff, interval, d.note)

    header = ("", "model", "threat", "attack", "quantity", "baseline", "current", "diff",
              "95% CI (unpaired)", "note")
    lines += [f"note: {n}" for n in result.notes]
    if fails:
        lines += ["", "regressions:", _table([row(d) for d in fails], header)]
    if result.missing:
        lines += ["", "missing from the run (present in the baseline):"]
        lines += [f"  {m}" for m in result.missing]
    if result.extra:
        lines += ["", "new in the run (not in the baseline): " + ", ".join(result.extra)]
    if result.differences:
        lines += ["", "all compared numbers:", _table([row(d) for d in result.differences],
                                                      header)]
    return "\n".join(lines)
