"""The leaderboard of a run as a pandas frame, built from the results store; the tables a
reader sees are in :mod:`unmask.bench.report.tables`, the pages in :mod:`unmask.bench.report.html`.

One row per model and threat: clean accuracy, each attack's robust accuracy in the cascade,
the row's one robust number (per sample the worst case over the ensemble, the masking
diagnosis's attacks and its follow-up, :func:`row_outcomes`) with its 95% Wilson interval, the
masking verdict with its failing checks and the follow-up (named, with its sample count), who
broke what, explanation scores, backdoor ASR, n, seed, runtime, checkpoint hash and versions.
Rows are ranked by that number within each threat (equal numbers share a rank), and only
rows whose diagnosis finished: a ``masked`` row is marked and not ranked (unless the adaptive
attack's re-checks passed: ``adaptive``), and a row without a diagnosis (masking off,
interrupted, error) or whose cell failed (``error: <message>``) says why it is not ranked. A
randomised model's sample is robust when it is classified correctly on a strict majority of
the draws (:func:`unmask.bench.core.robust_by_majority`).

Usage::

    with Store("results/unmask.sqlite", readonly=True) as st:
        df = leaderboard_frame(st, st.latest_run().run_id)

"""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import pandas as pd

from ...defenses import VERDICT_MEANING, MaskingReport
from ...explain.attribution import METHODS
from ...explain.metrics import score_infos
from ..core import DRAWS, SampleOutcomes
from ..core.threat import threat_key
from ..suite.store import WORST_CASE, Store, unit_key, wilson

__all__ = ["leaderboard_frame", "sections_frame", "row_outcomes", "verdict_legend"]


# Explanation metrics shown in the table, with short column names (the metric registry's).
_EXPLAIN_COLUMNS = {key: info.short for key, info in score_infos().items()}


def _method_short(method: str) -> str:
    """A stored method's short column label (the method registry's, else the name itself)."""
    return METHODS.get(method).short if method in METHODS else method


def _parse_report(row: dict[str, Any] | None):
    """The stored :class:`~unmask.defenses.MaskingReport` of a masking row, or None when the
    row holds no full report (an older or hand-written row)."""
    if row is None:
        return None
    try:
        return MaskingReport.from_dict(json.loads(row["report"]))
    except Exception:
        return None


def row_outcomes(samples: list[dict[str, Any]], report) -> tuple[SampleOutcomes, int]:
    """THE robust number of a row: per sample, the worst case over every attack that ran on
    it. ``samples`` are the ensemble's per-sample rows (in sample order); ``report`` the
    masking diagnosis (its ``outcomes``: the diagnosis's own attacks and the follow-up, on the
    first ``m`` samples of the same data). Returns the merged outcomes over all samples and
    ``m`` (0 without a diagnosis). A sample any attack broke is never robust, so the merged
    robust accuracy is never above what any attack reached on the same samples."""
    ordered = sorted(samples, key=lambda r: r["sample"])
    ensemble = SampleOutcomes(tuple(None if r["robust"] else (r["broken_by"] or "ensemble")
                                    for r in ordered))
    outcomes = getattr(report, "outcomes", None)
    if outcomes is None or not ensemble.n:
        return ensemble, 0
    m = min(outcomes.n, ensemble.n)
    head = SampleOutcomes(ensemble.broken_by[:m]).merge(
        SampleOutcomes(outcomes.broken_by[:m]))
    return SampleOutcomes(head.broken_by + ensemble.broken_by[m:]), m


def _broken_by(outcomes: SampleOutcomes, order: list[str]) -> dict[str, int]:
    counts = outcomes.counts()
    robust = outcomes.n - sum(counts.values())
    rest = [k for k in counts if k not in order and k != "clean"]
    # the ensemble's labels, then the diagnosis's, then the follow-up's
    rest.sort(key=lambda k: (k.startswith("diagnosis:") + 2 * k.startswith("follow-up:")))
    keys = ["clean"] + order + rest
    out = {k: counts[k] for k in keys if counts.get(k)}
    if robust:
        out["robust"] = robust
    return out


def _threats_of(config: dict[str, Any]) -> list[tuple[str, float]]:
    out = []
    for t in config.get("threats", []) if isinstance(config, dict) else []:
        eps = t.get("eps", [])
        for e in eps if isinstance(eps, list) else [eps]:
            out.append((t.get("norm"), float(e)))
    return out


def _follow_up_text(report, m_row: dict[str, Any] | None) -> str:
    """The follow-up's own figure, naming its attack and sample count."""
    follow = getattr(report, "follow_up", None)
    if follow:
        return (f"follow-up {follow.get('attack', '?')} on {follow.get('n', '?')} samples: "
                f"{follow['before']:.3f} -> {follow['after']:.3f}")
    if m_row is not None and m_row.get("robust_accuracy_after") is not None:
        before = m_row.get("robust_accuracy_before")
        head = "" if before is None else f"{before:.3f} -> "
        return (f"follow-up on {m_row['n']} samples: {head}"
                f"{m_row['robust_accuracy_after']:.3f}")
    return ""


def _masking_state(run, m_row, missing, masking_on: bool) -> dict[str, Any]:
    """Verdict, whether the row may be ranked, and why not."""
    if m_row is not None:
        report = _parse_report(m_row)
        verdict = m_row["verdict"]
        rankable = report.rankable if report is not None else verdict != "masked"
        adaptive = verdict == "masked" and rankable
        note = ("ranked on the adaptive attack's number (the masking checks passed against it)"
                if adaptive else "" if rankable else
                "masked: the number is not evidence of robustness")
        return {"verdict": verdict, "failing": ", ".join(json.loads(m_row["failing"])),
                "report": report, "rankable": rankable, "adaptive": adaptive, "note": note}
    if missing is not None:
        status, reason = missing["status"], missing["reason"]
        return {"verdict": f"{status}: {reason}", "failing": "", "report": None,
                "rankable": False, "adaptive": False,
                "note": f"no masking diagnosis ({status}: {reason})"}
    if not masking_on:
        why = "masking is off in this suite: no diagnosis, so no evidence the number is real"
    else:
        why = f"the masking diagnosis did not finish (run {run.status})"
    return {"verdict": "not run", "failing": "", "report": None, "rankable": False,
            "adaptive": False, "note": why}


def leaderboard_frame(store: Store, run_id: int) -> pd.DataFrame:
    """The leaderboard of ``run_id`` as a DataFrame (numbers as numbers).

    ``robust_accuracy`` is the row's one robust number (:func:`row_outcomes`): the per-sample
    worst case over the ensemble, the diagnosis's attacks and its follow-up;
    ``ensemble_robust_accuracy`` the ensemble's alone. A row is ranked only when its masking
    diagnosis finished and the report is rankable (not masked, or masked but the adaptive
    re-checks passed: then ``adaptive`` is true); ``rank_note`` says why not otherwise. A
    section that failed shows ``error: <message>`` and is never ranked.

    With ``[certify]``: ``certified`` is the certified robust accuracy of the best method
    (``certified_method``; per method ``certified_<method>``), a proven lower bound on the
    same samples; ``gap`` is ``robust_accuracy - certified`` and ``exact`` is true when the
    two coincide (the robust accuracy is then exact); ``certified_note`` says why a row has
    none (``not supported: <layer>``). A MILP counterexample (verified on the model in fp32)
    counts as broken in the row's worst case (``broken_by`` names it ``certify:milp``).
    """
    run = store.run(run_id)
    config = run.config if isinstance(run.config, dict) else {}
    masking_on = bool((config.get("masking") or {}).get("enabled", True))
    draws = (config.get("attacks") or {}).get("draws", DRAWS)
    cells = store.rows("cells", run_id)
    samples = store.rows("samples", run_id)
    masking = {(m["model"], m["norm"], m["eps"]): m for m in store.rows("masking", run_id)}
    sections = store.rows("sections", run_id)
    missing_of = {(s["model"], s["section"], s["detail"]): s for s in sections}
    explanations = store.rows("explanations", run_id)
    backdoor = defaultdict(dict)
    for b in store.rows("backdoor", run_id):
        backdoor[b["model"]][b["metric"]] = b["value"]
    units = {u["unit"]: u["wall_seconds"] for u in store.rows("units", run_id)}
    certified_of: dict[tuple, list] = defaultdict(list)
    for c in store.rows("certified", run_id):
        certified_of[(c["model"], c["norm"], c["eps"])].append(c)
    counterexamples: dict[tuple, dict[int, str]] = defaultdict(dict)
    for c in store.rows("certified_samples", run_id):
        if c["counterexample"]:
            counterexamples[(c["model"], c["norm"], c["eps"])][c["sample"]] = c["method"]
    versions = run.versions
    version_text = ", ".join(f"{k} {versions[k]}" for k in ("unmask", "torch") if k in versions)
    by_sample: dict[tuple, list] = defaultdict(list)
    for smp in samples:
        by_sample[(smp["model"], smp["norm"], smp["eps"])].append(smp)
    groups: dict[tuple, list] = defaultdict(list)
    for c in cells:
        groups[(c["model"], c["norm"], c["eps"])].append(c)
    model_order = [m.get("label") or m["name"] for m in config.get("models", [])]
    in_run = set(model_order)
    rows = []
    for (model, norm, eps), cs in groups.items():
        if in_run and model not in in_run:
            continue  # dropped from the run (resume --skip); its rows stay in the store
        cs = sorted(cs, key=lambda c: c["position"])
        worst = next(c for c in cs if c["attack"] == WORST_CASE)
        attacks = [c for c in cs if c["attack"] != WORST_CASE]
        threat = threat_key(norm, eps)
        m_row = masking.get((model, norm, eps))
        state = _masking_state(run, m_row, missing_of.get((model, "masking", threat)),
                               masking_on)
        merged, m = row_outcomes(by_sample[(model, norm, eps)], state["report"])
        n = worst["n"]
        cex = counterexamples.get((model, norm, eps))
        if cex and merged.n == n:  # a verified MILP counterexample breaks the sample
            merged = merged.merge(SampleOutcomes(tuple(
                f"certify:{cex[i]}" if i in cex else None for i in range(n))))
        if merged.n == n:
            robust = n - len([b for b in merged.broken_by if b is not None])
        else:  # no per-sample rows (hand-written cells): the ensemble's count
            robust = worst["robust"]
        lo, hi = wilson(robust, n)
        follow = _follow_up_text(state["report"], m_row)
        over = f"ensemble on {n}"
        if m:
            what = "diagnosis and follow-up" if follow else "diagnosis"
            over += f"; {what} on the first {m}" if m < n else f"; {what} on all {m}"
        row: dict[str, Any] = {
            "model": model, "threat": threat, "norm": norm, "eps": eps,
            "clean_accuracy": worst["clean_accuracy"],
        }
        for c in attacks:
            row[f"after {c['attack']}"] = c["robust_accuracy"]
        row.update({
            "robust_accuracy": robust / n, "ci_low": lo, "ci_high": hi,
            "ensemble_robust_accuracy": worst["robust_accuracy"], "worst_case_over": over,
            "robust_accuracy_std": worst["robust_accuracy_std"],
            "draws": draws if worst["stochastic"] else None,
            "status": "ok", "masking": state["verdict"], "failing_checks": state["failing"],
            "masking_follow_up": (m_row["robust_accuracy_after"] if m_row is not None else None),
            "follow_up": follow, "adaptive": state["adaptive"],
            "_rankable": state["rankable"], "rank_note": state["note"],
            "broken_by": ", ".join(f"{k} {v}" for k, v in
                                   _broken_by(merged, [c["attack"] for c in attacks]).items()),
        })
        for e in explanations:
            if e["model"] == model and e["metric"] in _EXPLAIN_COLUMNS:
                col = (f"{_method_short(e['method'])} "
                       f"{_EXPLAIN_COLUMNS[e['metric']]}")
                row[col] = e["value"]
        bd = backdoor.get(model, {})
        row["backdoor_asr"] = bd.get("attack_success_rate")
        row.update(_certified_fields(certified_of.get((model, norm, eps), []), robust, n))
        runtime = units.get(unit_key("attack", model, threat), worst["wall_seconds"])
        runtime += units.get(unit_key("masking", model, threat), 0.0)
        row.update({
            "n": n, "seed": run.seed, "runtime_s": runtime,
            "forwards": worst["forwards"], "backwards": worst["backwards"],
            "stochastic": bool(worst["stochastic"]),
            "checkpoint_sha256": worst["checkpoint_sha256"] or "",
            "source": worst["model_source"] or "", "versions": version_text,
        })
        rows.append(row)
    # Rows without numbers: a model or a cell that failed. Shown, never ranked.
    have = {(r["model"], r["threat"]) for r in rows}
    threats = _threats_of(config)
    for sec in sections:
        if sec["status"] != "error" or sec["section"] not in ("model", "attack"):
            continue
        if in_run and sec["model"] not in in_run:
            continue
        wanted = ([(sec["detail"], None)] if sec["detail"] else
                  [(f"{nm}:{e:g}", (nm, e)) for nm, e in threats] or [("-", None)])
        for threat, _ in wanted:
            if (sec["model"], threat) in have:
                continue
            have.add((sec["model"], threat))
            norm, _, eps = threat.partition(":")
            message = f"error: {sec['reason']}"
            rows.append({"model": sec["model"], "threat": threat, "norm": norm,
                         "eps": float(eps) if eps else float("nan"), "status": message,
                         "masking": message if sec["section"] == "model" else "not run",
                         "failing_checks": "", "_rankable": False,
                         "rank_note": f"{sec['section']} failed: {sec['reason']}",
                         "broken_by": "", "seed": run.seed, "versions": version_text,
                         "adaptive": False, "follow_up": "", "worst_case_over": ""})
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["rank", "model", "threat", "clean_accuracy",
                                     "robust_accuracy", "ci_low", "ci_high", "masking",
                                     "broken_by"])
    for col in ("clean_accuracy", "robust_accuracy", "ci_low", "ci_high",
                "ensemble_robust_accuracy", "robust_accuracy_std", "masking_follow_up",
                "backdoor_asr", "runtime_s", "certified", "gap"):
        if col in df:
            df[col] = pd.to_numeric(df[col], errors="coerce")
    df["_unranked"] = ~df["_rankable"].astype(bool)
    df["_order"] = df["model"].map({m: i for i, m in enumerate(model_order)}).fillna(1e9)
    df["_missing"] = df["robust_accuracy"].isna()
    df = df.sort_values(["norm", "eps", "_unranked", "_missing", "robust_accuracy", "_order"],
                        ascending=[True, True, True, True, False, True], kind="mergesort")
    ranks = []
    for (_, _), group in df.groupby(["norm", "eps"], sort=False, dropna=False):
        # competition ranking: equal robust accuracies share a rank (1, 2, 2, 4)
        position, rank, last = 0, 0, None
        for unranked, value in zip(group["_unranked"], group["robust_accuracy"]):
            if unranked:
                ranks.append(None)
                continue
            position += 1
            if last is None or not abs(float(value) - last) <= 1e-12:
                rank, last = position, float(value)
            ranks.append(rank)
    df.insert(0, "rank", pd.array(ranks, dtype="Int64"))
    return df.drop(columns=["_unranked", "_order", "_missing", "_rankable"]
                   ).reset_index(drop=True)


def _certified_fields(rows: list[dict[str, Any]], robust: int, n: int) -> dict[str, Any]:
    """The certified columns of one leaderboard row from its ``certified`` rows."""
    if not rows:
        return {}
    out: dict[str, Any] = {}
    for r in rows:
        out[f"certified_{r['method']}"] = r["certified_accuracy"]
    tightness = {"ibp": 0, "crown": 1, "milp": 2}  # a tie names the tightest method
    usable = [r for r in rows if r["status"] == "ok" and r["n"] == n]
    best = max(usable, key=lambda r: (r["certified"], tightness.get(r["method"], -1)),
               default=None)
    notes = sorted({r["reason"] for r in rows if r["status"] != "ok" and r["reason"]})
    if best is None:
        out.update(certified=None, certified_method="", gap=None, exact=False,
                   certified_note="; ".join(notes) or "certified on fewer samples than the row")
        return out
    out.update(certified=best["certified_accuracy"], certified_method=best["method"],
               gap=(robust - best["certified"]) / n, exact=best["certified"] == robust,
               certified_note="; ".join(notes))
    return out


def sections_frame(store: Store, run_id: int) -> pd.DataFrame:
    """Everything the suite asked for that did not run, with the reason (models dropped from
    a resumed run left out)."""
    config = store.run(run_id).config
    in_run = {m.get("label") or m["name"] for m in (config.get("models", [])
                                                     if isinstance(config, dict) else [])}
    rows = [r for r in store.rows("sections", run_id) if not in_run or r["model"] in in_run]
    return pd.DataFrame([{k: r[k] for k in ("model", "section", "detail", "status", "reason")}
                         for r in rows], columns=["model", "section", "detail", "status",
                                                  "reason"])


def verdict_legend() -> str:
    """One line: what clean / suspicious / masked mean and what the reader should do."""
    return "Verdicts: " + "; ".join(f"{k}: {v}" for k, v in VERDICT_MEANING.items()) + "."


def _header_lines(store: Store, run_id: int) -> list[str]:
    run = store.run(run_id)
    wall = f"{run.wall_seconds:.1f}s" if run.wall_seconds is not None else "unfinished"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(run.versions.items()))
    lines = [f"suite {run.suite}{' (quick)' if run.quick else ''}, run {run_id}, {run.status}",
             f"seed {run.seed}; device {run.device} x {run.world_size}; wall {wall}; "
             f"commit {run.git_commit or 'unknown'}",
             f"versions: {versions}"]
    attacks = run.config.get("attacks") if isinstance(run.config, dict) else None
    precision = attacks.get("precision") if isinstance(attacks, dict) else None
    if precision and precision != "fp32":  # a reader comparing tables must see it
        lines.append(f"attack search precision: {precision} autocast for gradient attacks; "
                     "every verdict is the fp32 model's (docs/performance.md)")
    return lines
