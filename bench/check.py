"""Regression checks on robustness numbers: a run against a baseline, within statistical
tolerance.

A baseline is a JSON file (``results/baselines/default.json``) holding, per model x threat x
attack, the sample count and the clean and robust counts of a reference run, plus each
masking verdict. :func:`compare` tests every number of the baseline against the current run:
the 95% confidence interval of the difference of two binomial proportions is built from both
runs' Wilson intervals (Newcombe 1998, method 10, the "hybrid score" interval), and a number
fails when that interval excludes 0. There is no fixed epsilon: with 100 samples a few points
of noise pass, with 10,000 they do not. A masking verdict that gets worse (``clean`` ->
``suspicious`` -> ``masked``) fails too.

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
           "compare", "CheckResult", "Difference", "newcombe", "format_result"]

BASELINE_SCHEMA = 1
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
    cells = [{k: c[k] for k in ("model", "norm", "eps", "attack", "n", "clean_correct", "robust",
                                "clean_accuracy", "robust_accuracy", "ci_low", "ci_high")}
             for c in store.rows("cells", run_id)]
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


def compare(baseline: dict[str, Any], current: dict[str, Any], *, only_drops: bool = False,
            all_attacks: bool = False) -> CheckResult:
    """Compare ``current`` with ``baseline`` (both in baseline form, see
    :func:`baseline_from_store`)."""
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
              "95% CI of diff", "note")
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
