"""Regression checks on robustness numbers: a run against a baseline, sample by sample.

A baseline is a JSON file (``results/baselines/default.json``, schema :data:`BASELINE_SCHEMA`)
holding, per model x threat, the reference run's row: the sample count, clean and robust
counts, and for the worst case (the row's one number) the per-sample outcomes (sample ids,
labels, clean correctness, robust or the attack that broke it), the model's fingerprint
(:func:`unmask.bench.zoo.fingerprint`: weights and structure), the settings that decide the
numbers (seed, batch size, sample count, the ensemble's attack budget, the diagnosis
settings) and the library versions; plus each masking verdict.

:func:`compare` tests the current run against the baseline on the SAME samples, paired: per
row, the samples robust in the baseline and broken now (``newly broken``) against those
broken then and robust now (``newly robust``), with an exact McNemar test (a two-sided
binomial test on the discordant samples). A row fails on a significant drop (p < 0.05 and
more newly broken than newly robust) or on a drop larger than ``tolerance``, and names the
newly broken and newly robust samples. Paired, a drop of 8 points with 16 newly broken
samples and none fixed fails at n = 200 (p = 3e-5), where comparing the two runs as
independent samples let it pass. A significant rise fails too unless ``only_drops`` (an
unchanged model that got more robust points at a weaker evaluation).

The default tolerance, :data:`TOLERANCE` = 5 points, is a backstop for small samples, where the
McNemar test cannot call a real drop significant (n = 50: 3 newly broken, none fixed, is p =
0.25 and 6 points). It sits well above the noise of an unchanged model: at the same seed a
rerun is identical, and reruns with other seeds (``--allow-changed``) moved robust accuracy at
n = 200 by at most 0.5 points (digits-mlp at Linf 0.05 and 0.1 and the scenario model of
``tests/test_check.py`` over 20 seeds, mnist-cnn at Linf 0.1 over 10, the quick preset; the
test asserts every such rerun passes). Lower it with ``--tolerance`` for a stricter gate.

A changed fingerprint, other samples or changed settings are reported and fail unless
``allow_changed``; changed library versions are a note. Older baselines are still read:
schema 1 (no per-sample outcomes) is compared unpaired (the Newcombe interval of two
independent proportions) and schema 2 paired, without fingerprint or settings (its hash
covered the weights only), each with a note saying so. A masking verdict that gets worse
(``clean`` -> ``suspicious`` -> ``masked``) fails too.

Usage::

    baseline = read_baseline(Path("results/baselines/default.json"))
    result = compare(baseline, baseline_from_store(store, run_id))
    assert result.passed, format_result(result)
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.fileio import atomic_write as _atomic_write
from ..core.text import text_table
from ..suite.spec import parse_suite
from ..suite.store import WORST_CASE, Store, wilson
from . import frames

__all__ = ["BASELINE_SCHEMA", "baseline_from_store", "helper_baseline", "write_baseline",
           "read_baseline", "compare", "RegressionResult", "Difference", "newcombe", "mcnemar",
           "format_result", "TOLERANCE", "ALPHA"]

BASELINE_SCHEMA = 3
# A drop larger than this fails even when the McNemar test cannot call it significant (small
# n); see the module docstring for why 5 points.
TOLERANCE = 0.05
ALPHA = 0.05
_VERDICT_ORDER = {"clean": 0, "suspicious": 1, "masked": 2}
_IDS_SHOWN = 20


def mcnemar(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs: the two-sided
    binomial test of ``min(b, c)`` successes in ``b + c`` trials at p = 1/2."""
    for name, v in (("b", b), ("c", c)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be a non-negative int (a count of pairs), got {v!r}")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = math.fsum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def newcombe(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float, float]:
    """``(difference, low, high)``: the 95% hybrid score interval of ``k1/n1 - k2/n2``."""
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1)
    l2, u2 = wilson(k2, n2)
    d = p1 - p2
    low = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    high = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return d, low, high


# --- baselines --------------------------------------------------------------------------------


def _run_settings(run: Any, norm: str, eps: float) -> dict[str, Any]:
    """What decides a row's numbers besides the model: seed, batch size, samples, the attack
    budget of the ensemble at this threat and the diagnosis settings."""
    cfg = run.config if isinstance(run.config, dict) else {}
    try:
        attacks = parse_suite(cfg, check_zoo=False).build_attacks(norm, eps).config()
    except Exception as err:  # a config this version cannot rebuild: keep what was stored
        attacks = {"suite": cfg.get("attacks"), "unresolved": f"{type(err).__name__}: {err}"}
    masking = cfg.get("masking") or {}
    return {"seed": run.seed, "batch_size": cfg.get("batch_size"), "n": cfg.get("n"),
            "dataset": cfg.get("dataset"), "data_options": cfg.get("data_options") or {},
            "attacks": attacks,
            "diagnosis": None if not masking.get("enabled", True) else {
                "fast": masking.get("fast"), "follow_up": masking.get("follow_up"),
                "n": masking.get("n"), "surrogate": masking.get("surrogate", "auto")}}


def baseline_from_store(store: Store, run_id: int) -> dict[str, Any]:
    """The rows of run ``run_id`` in baseline form (schema :data:`BASELINE_SCHEMA`)."""
    run = store.run(run_id)

    per_sample: dict[tuple, list[dict[str, Any]]] = {}
    for s in store.rows("samples", run_id):
        per_sample.setdefault((s["model"], s["norm"], float(s["eps"])), []).append(s)
    reports = {(m["model"], m["norm"], float(m["eps"])): m for m in store.rows("masking", run_id)}
    cells = []
    for c in store.rows("cells", run_id):
        cell = {k: c[k] for k in ("model", "norm", "eps", "attack", "n", "clean_correct",
                                  "robust", "clean_accuracy", "robust_accuracy", "ci_low",
                                  "ci_high")}
        # The runner records zoo.fingerprint (weights and structure) in this column.
        cell["fingerprint"] = c["checkpoint_sha256"]
        key = (c["model"], c["norm"], float(c["eps"]))
        rows = per_sample.get(key)
        if c["attack"] == WORST_CASE and rows:
            rows = sorted(rows, key=lambda r: r["sample"])
            # The row's one number: the worst case over the ensemble AND the diagnosis and its
            # follow-up, as the leaderboard reports it.
            merged, _ = frames.row_outcomes(rows, frames._parse_report(reports.get(key)))
            robust = [int(b is None) for b in merged.broken_by]
            cell["samples"] = {"ids": [r["sample"] for r in rows],
                               "labels": [int(r["label"]) for r in rows],
                               "clean_correct": [int(r["clean_correct"]) for r in rows],
                               "robust": robust, "broken_by": list(merged.broken_by)}
            cell["robust"] = sum(robust)
            cell["robust_accuracy"] = sum(robust) / len(robust)
            cell["ci_low"], cell["ci_high"] = wilson(sum(robust), len(robust))
            cell["settings"] = _run_settings(run, c["norm"], float(c["eps"]))
            cell["versions"] = run.versions
        cells.append(cell)
    masking = [{k: m[k] for k in ("model", "norm", "eps", "verdict")}
               for m in store.rows("masking", run_id)]
    return {"schema": BASELINE_SCHEMA, "kind": "unmask-baseline", "source": "unmask run",
            "suite": run.suite, "run_id": run_id, "status": run.status, "quick": run.quick,
            "seed": run.seed, "config_hash": run.config_hash, "git_commit": run.git_commit,
            "versions": run.versions, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cells": cells, "masking": masking}


def helper_baseline(result: Any, threat: Any, *, settings: dict[str, Any],
                    versions: dict[str, str], model: str = "model") -> dict[str, Any]:
    """The baseline form of one :class:`~unmask.bench.report.testing.RobustAccuracy` (what
    ``assert_robust_accuracy(baseline=...)`` writes and compares)."""
    outcomes = list(result.outcomes.broken_by)
    robust = [int(b is None) for b in outcomes]
    n = len(robust)
    norm, eps = threat.norm.value, float(threat.eps)
    cell = {"model": model, "norm": norm, "eps": eps, "attack": WORST_CASE, "n": n,
            "clean_correct": sum(result.clean_correct), "robust": sum(robust),
            "clean_accuracy": sum(result.clean_correct) / n, "robust_accuracy": sum(robust) / n,
            "ci_low": result.ci_low, "ci_high": result.ci_high,
            "fingerprint": result.fingerprint,
            "samples": {"ids": list(range(n)), "clean_correct": list(result.clean_correct),
                        "robust": robust, "broken_by": outcomes},
            "settings": settings, "versions": versions}
    masking = [] if result.verdict is None else [
        {"model": model, "norm": norm, "eps": eps,
         "verdict": getattr(result.verdict, "value", result.verdict)}]
    return {"schema": BASELINE_SCHEMA, "kind": "unmask-baseline",
            "source": "assert_robust_accuracy", "seed": settings.get("seed"),
            "versions": versions, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "cells": [cell], "masking": masking}


def write_baseline(baseline: dict[str, Any], path: str | Path) -> Path:
    """Write ``baseline`` atomically as indented JSON (parent folders are created)."""

    _atomic_write(Path(path), (json.dumps(baseline, indent=2, sort_keys=True) + "\n").encode())
    return Path(path)


def read_baseline(path: str | Path) -> dict[str, Any]:
    """A baseline written by :func:`write_baseline` (any schema up to this version's)."""
    try:
        doc = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"baseline {path} is not valid JSON: {err}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "unmask-baseline":
        raise ValueError(f"{path} is not an unmask baseline (write one with unmask check "
                         f"--baseline {path} --write)")
    schema = doc.get("schema", 1)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise ValueError(f"baseline {path} has an invalid schema {schema!r} (an int >= 1)")
    if schema > BASELINE_SCHEMA:
        raise ValueError(f"baseline {path} has schema {schema}, newer than this unmask reads "
                         f"({BASELINE_SCHEMA}): upgrade unmask")
    if not isinstance(doc.get("cells"), list):
        raise ValueError(f"baseline {path} has no list of cells")
    return doc


# --- comparison -------------------------------------------------------------------------------


@dataclass
class Difference:
    """One compared quantity of one row.

    ``quantity`` is ``clean_accuracy``, ``robust_accuracy``, ``masking``, ``fingerprint``,
    ``settings`` or ``samples``. Paired comparisons fill ``newly_broken``/``newly_robust``
    (sample ids) and ``p_value`` (exact McNemar); unpaired ones ``low``/``high`` (Newcombe)."""

    model: str
    threat: str
    attack: str
    quantity: str
    baseline: Any
    current: Any
    difference: float | None = None
    low: float | None = None
    high: float | None = None
    failed: bool = False
    note: str = ""
    newly_broken: list[int] = field(default_factory=list)
    newly_robust: list[int] = field(default_factory=list)
    p_value: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The difference as a JSON-ready dict (every field)."""
        return asdict(self)


@dataclass
class RegressionResult:
    """The outcome of :func:`compare`: every compared number, what is missing and new."""

    differences: list[Difference] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Difference]:
        """The differences that fail the check."""
        return [d for d in self.differences if d.failed]

    @property
    def passed(self) -> bool:
        """True when no difference fails and no baseline row is missing."""
        return not self.failures and not self.missing

    def to_dict(self) -> dict[str, Any]:
        """The outcome as a JSON-ready dict: passed, differences, missing, extra, notes."""
        return {"passed": self.passed, "differences": [d.to_dict() for d in self.differences],
                "missing": list(self.missing), "extra": list(self.extra),
                "notes": list(self.notes)}


def _key(c: dict[str, Any]) -> tuple[str, str, float, str]:
    return (c["model"], c["norm"], float(c["eps"]), c["attack"])


def _ids(ids: list[int], broken_by: list | None = None) -> str:
    shown = [f"{i} ({broken_by[k]})" if broken_by is not None and broken_by[k] else str(i)
             for k, i in ids[:_IDS_SHOWN]]
    return ", ".join(shown) + (f" ... ({len(ids)} in all)" if len(ids) > _IDS_SHOWN else "")


def _paired(base: list[int], cur: list[int], ids: list[int], tolerance: float,
            broken_by: list | None) -> tuple[float, float, bool, str, list[int], list[int]]:
    """``(difference, p, failed, note, newly broken ids, newly robust ids)`` of two
    per-sample 0/1 outcome lists on the same ids (``broken_by``: the current run's, per
    sample, to say who broke the newly broken)."""
    broken = [(k, i) for k, (i, b, c) in enumerate(zip(ids, base, cur)) if b and not c]
    fixed = [(k, i) for k, (i, b, c) in enumerate(zip(ids, base, cur)) if c and not b]
    n = len(ids)
    d = (len(fixed) - len(broken)) / n
    p = mcnemar(len(broken), len(fixed))
    significant = p < ALPHA and len(broken) > len(fixed)
    failed = significant or -d > tolerance + 1e-12
    note = f"{len(broken)} newly broken, {len(fixed)} newly robust, McNemar p = {p:.2g}"
    if broken:
        note += f"; newly broken: {_ids(broken, broken_by)}"
    if fixed:
        note += f"; newly robust: {_ids(fixed)}"
    if failed:
        note = ("significant drop; " if significant else
                f"drop beyond the {tolerance * 100:g}-point tolerance; ") + note
    return d, p, failed, note, [i for _, i in broken], [i for _, i in fixed]


def _changes(a: Any, b: Any, path: str = "") -> list[str]:
    """Readable differences between two JSON values (``path: old -> new``)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{path}.{k}" if path else str(k)
            if k not in a:
                out.append(f"{sub}: (absent) -> {json.dumps(b[k], default=str)}")
            elif k not in b:
                out.append(f"{sub}: {json.dumps(a[k], default=str)} -> (absent)")
            else:
                out += _changes(a[k], b[k], sub)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [c for i, (u, v) in enumerate(zip(a, b)) for c in _changes(u, v, f"{path}[{i}]")]
    if a != b:
        return [f"{path}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}"]
    return []


def _changed(result: RegressionResult, b: dict[str, Any], threat: str, quantity: str,
             old: Any, new: Any, what: str, allow_changed: bool) -> None:
    result.differences.append(Difference(
        b["model"], threat, b["attack"], quantity, old, new, failed=not allow_changed,
        note=what + (" (allowed)" if allow_changed else "; --allow-changed to compare anyway")))


def compare(baseline: dict[str, Any], current: dict[str, Any], *, only_drops: bool = False,
            all_attacks: bool = False, tolerance: float = TOLERANCE,
            allow_changed: bool = False, exact: bool = False) -> RegressionResult:
    """Compare ``current`` with ``baseline`` (both in baseline form, see
    :func:`baseline_from_store` and :func:`helper_baseline`): paired per sample where both
    record the outcomes of the same samples.

    Args:
        only_drops: a significant rise passes (by default it fails: an unchanged model that
            got more robust points at a weaker evaluation).
        all_attacks: compare every ensemble member's robust accuracy too (unpaired).
        tolerance: a drop larger than this share fails even when not significant.
        allow_changed: a changed fingerprint, other samples or changed settings are reported
            but do not fail.
        exact: any per-sample change fails, in either direction (one newly broken or one
            newly robust sample): for a deterministic rerun of committed numbers, such as
            unmask's own CI, where a weaker attack shows as a rise.
    """
    if not 0.0 <= float(tolerance) <= 1.0:
        raise ValueError(f"tolerance must be a share in [0, 1] (0.05 = 5 points), got "
                         f"{tolerance}")
    result = RegressionResult()
    schema = baseline.get("schema", 1)
    if schema < 3:
        result.notes.append(
            f"the baseline has schema {schema}: it records no model fingerprint (its hash "
            "covered the weights only) and no settings, so neither is compared; rewrite it "
            "with --write")
    if baseline.get("config_hash") and current.get("config_hash") \
            and baseline["config_hash"] != current["config_hash"]:
        result.notes.append(
            f"the run's suite configuration ({current.get('suite')}"
            f"{', quick' if current.get('quick') else ''}, {current['config_hash']}) differs "
            f"from the baseline's ({baseline.get('suite')}"
            f"{', quick' if baseline.get('quick') else ''}, {baseline['config_hash']}): "
            "differences may come from the configuration, not the model")
    cur = {_key(c): c for c in current["cells"]}
    base_keys = set()
    version_notes: list[str] = []
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
        if schema >= 3 and b["attack"] == WORST_CASE:
            fb, fc = b.get("fingerprint"), c.get("fingerprint")
            if fb and fc and fb != fc:
                _changed(result, b, threat, "fingerprint", fb[:12], fc[:12],
                         "the model changed (weights or structure)", allow_changed)
            sb_set, sc_set = b.get("settings"), c.get("settings")
            if sb_set is not None and sc_set is not None and sb_set != sc_set:
                what = _changes(sb_set, sc_set)
                _changed(result, b, threat, "settings", "", "",
                         "settings changed: " + "; ".join(what[:6])
                         + (f" ... ({len(what)} in all)" if len(what) > 6 else ""),
                         allow_changed)
            vb, vc = b.get("versions"), c.get("versions")
            if isinstance(vb, dict) and isinstance(vc, dict) and vb != vc:
                what = "library versions differ from the baseline's: " + ", ".join(
                    _changes(vb, vc)) + " (differences may come from the libraries)"
                if what not in version_notes:
                    version_notes.append(what)
        sb, sc = b.get("samples"), c.get("samples")
        same = bool(sb and sc and sb["ids"] == sc["ids"]
                    and (sb.get("labels") is None or sc.get("labels") is None
                         or sb["labels"] == sc["labels"]))
        if same:
            for quantity, count in quantities:
                d, p, failed, note, broken, fixed = _paired(
                    sb[count], sc[count], sb["ids"], tolerance,
                    sc.get("broken_by") if quantity == "robust_accuracy" else None)
                rose = d > 0 and p < ALPHA
                failed = failed or (rose and not only_drops)
                if rose:
                    note = "rose significantly" + (" (allowed)" if only_drops else "") + \
                        "; " + note
                if exact and (broken or fixed) and not failed:
                    failed, note = True, "changed (exact check); " + note
                result.differences.append(Difference(
                    b["model"], threat, b["attack"], quantity, b[count] / b["n"],
                    c[count] / c["n"], d, None, None, failed, note, broken, fixed, p))
            continue
        if sb and sc:
            _changed(result, b, threat, "samples", len(sb["ids"]), len(sc["ids"]),
                     "not the same samples (ids or labels differ): cannot pair; compared "
                     "unpaired", allow_changed)
        elif b["attack"] == WORST_CASE and not sb:
            result.notes.append(f"{b['model']} {threat}: the baseline has no per-sample "
                                "outcomes (an older baseline): compared unpaired; rewrite it "
                                "with --write to compare paired")
        for quantity, count in quantities:
            d, low, high = newcombe(c[count], c["n"], b[count], b["n"])
            failed = high < 0 or (low > 0 and not only_drops)
            note = ""
            if high < 0:
                note = "dropped beyond the unpaired 95% interval"
            elif low > 0:
                note = "rose beyond the unpaired 95% interval" + \
                    ("" if not only_drops else " (allowed)")
            result.differences.append(Difference(
                b["model"], threat, b["attack"], quantity, b[count] / b["n"], c[count] / c["n"],
                d, low, high, failed, note))
    result.notes += version_notes
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


def format_result(result: RegressionResult) -> str:
    """A readable report: failures first, then every compared number."""

    lines = []
    fails = result.failures
    status = "PASSED" if result.passed else "FAILED"
    lines.append(f"unmask check {status}: {len(result.differences)} numbers compared, "
                 f"{len(fails)} failed, {len(result.missing)} missing")

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
        lines += ["", "regressions:", text_table([row(d) for d in fails], header)]
    if result.missing:
        lines += ["", "missing from the run (present in the baseline):"]
        lines += [f"  {m}" for m in result.missing]
    if result.extra:
        lines += ["", "new in the run (not in the baseline): " + ", ".join(result.extra)]
    if result.differences:
        lines += ["", "all compared numbers:", text_table([row(d) for d in result.differences],
                                                      header)]
    return "\n".join(lines)
