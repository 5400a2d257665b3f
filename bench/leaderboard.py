"""The leaderboard of a run as a pandas frame, built from the results store; the tables a
reader sees are in :mod:`unmask.bench.tables`, the pages in :mod:`unmask.bench.report_html`.

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
        write_report(st, run_id, Path("results"))   # tables, evidence/, report.html
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pandas as pd

from ..explain.attribution import METHODS
from ..explain.metrics import score_infos
from .core import DRAWS, SampleOutcomes
from .store import WORST_CASE, Store, wilson

__all__ = ["leaderboard_frame", "render", "write_report", "write_text", "sections_frame",
           "row_outcomes", "verdict_legend"]

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
        from ..defenses import MaskingReport

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
        threat = f"{norm}:{eps:g}"
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
        runtime = units.get(f"attack/{model}/{threat}", worst["wall_seconds"])
        runtime += units.get(f"masking/{model}/{threat}", 0.0)
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


# --- rendering (the tables: tables.py; the pages: report_html.py) ---------------------------


def verdict_legend() -> str:
    """One line: what clean / suspicious / masked mean and what the reader should do."""
    try:
        from ..defenses import VERDICT_MEANING
    except ImportError:  # pragma: no cover - the masking package is part of unmask
        return ""
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


def render(store: Store, run_id: int, fmt: str = "md", *, evidence_dir: str | None = None
           ) -> str:
    """The main table of ``run_id`` as Markdown (with the explanation and backdoor tables),
    CSV (:data:`unmask.bench.tables.MAIN_CSV_COLUMNS`), a self-contained HTML page or LaTeX.
    ``evidence_dir``: link each model to its evidence page there (relative; the pages are
    written by :func:`write_report`, so the default is no links)."""
    from . import report_html as rh
    from . import tables as tb

    if fmt == "csv":
        return rh.main_csv(store, run_id, evidence_dir=evidence_dir)
    if fmt == "md":
        return rh.render_markdown(store, run_id, evidence_dir=evidence_dir)
    if fmt == "html":
        return rh.render_html(store, run_id, evidence_dir=evidence_dir)
    if fmt == "latex":
        df = leaderboard_frame(store, run_id)
        frames = []
        for threat, ranked, apart in tb.main_tables(df, defenses=tb.defense_texts(store, run_id),
                                                    evidence_dir=None):
            for t in (ranked, apart):
                if t.rows:
                    part = pd.DataFrame([[c.text for c in r] for r in t.rows], columns=t.columns)
                    part.insert(0, "threat", threat)
                    frames.append(part)
        if not frames:
            return "% no results\n"
        return pd.concat(frames, ignore_index=True).fillna("").to_latex(index=False, escape=True)
    raise ValueError(f"unknown format {fmt!r}; expected md, csv, html or latex")


def write_text(path: Path, text: str) -> Path:
    from .fileio import atomic_write as _atomic_write

    _atomic_write(Path(path), text.encode("utf-8"))
    return Path(path)


def _figure(_: Path | None = None):
    from matplotlib.figure import Figure

    return Figure(figsize=(7, 4), dpi=100)


def _save(fig, path: Path) -> Path:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return write_bytes(path, buf.getvalue())


def write_bytes(path: Path, payload: bytes) -> Path:
    from .fileio import atomic_write as _atomic_write

    _atomic_write(Path(path), payload)
    return Path(path)


def _plots(store: Store, run_id: int, df: pd.DataFrame, fig_dir: Path) -> list[tuple[Path, str]]:
    """The report's figures: robust accuracy vs eps, who broke what, attack cost, maps."""
    out: list[tuple[Path, str]] = []
    if "robust_accuracy" in df:
        df = df[df["robust_accuracy"].notna()]  # rows of failed cells have no numbers
    if df.empty:
        return out
    # robust accuracy vs eps, per norm: the security curves (unmask.bench.curve_report)
    from .curve_report import robust_vs_eps_figures

    out += robust_vs_eps_figures(store, run_id, df, fig_dir)
    # who broke what + attack cost, per threat
    cells = store.rows("cells", run_id)
    for threat, group in df.groupby("threat", sort=False):
        models = group["model"].tolist()
        norm, eps = group["norm"].iloc[0], group["eps"].iloc[0]
        per = {m: [c for c in cells if c["model"] == m and c["norm"] == norm
                   and c["eps"] == eps and c["attack"] != WORST_CASE] for m in models}
        attacks = []
        for m in models:
            for c in sorted(per[m], key=lambda c: c["position"]):
                if c["attack"] not in attacks:
                    attacks.append(c["attack"])
        fig = _figure(fig_dir)
        ax = fig.add_subplot(1, 1, 1)
        left = [0.0] * len(models)
        n = group["n"].tolist()
        segments = [("clean", [(nn_ - cc) / nn_ for nn_, cc in
                               zip(n, (group["clean_accuracy"] * group["n"]).round())])]
        for a in attacks:
            segments.append((a, [next((c["broken"] / c["n"] for c in per[m] if c["attack"] == a),
                                      0.0) for m in models]))
        if "ensemble_robust_accuracy" in group:  # what the diagnosis and follow-up added
            segments.append(("diagnosis and follow-up",
                             (group["ensemble_robust_accuracy"] - group["robust_accuracy"])
                             .clip(lower=0).tolist()))
        segments.append(("robust", group["robust_accuracy"].tolist()))
        for label, widths in segments:
            ax.barh(models, widths, left=left, label=label)
            left = [lft + w for lft, w in zip(left, widths)]
        ax.set_xlabel("share of samples")
        ax.set_title(f"Who broke what at {threat} (misclassified clean, broken by each "
                     "attack, robust)")
        ax.legend(fontsize=7, loc="lower right")
        ax.invert_yaxis()
        safe = threat.replace(":", "_")
        p = _save(fig, fig_dir / f"broken_by_{safe}.png")
        out.append((p, f"Attack ensemble breakdown at {threat}"))
        fig = _figure(fig_dir)
        ax = fig.add_subplot(1, 1, 1)
        width = 0.8 / max(1, len(attacks))
        for i, a in enumerate(attacks):
            vals = [next((c["forwards"] + c["backwards"] for c in per[m] if c["attack"] == a), 0)
                    for m in models]
            ax.bar([j + i * width for j in range(len(models))], [max(v, 1) for v in vals],
                   width=width, label=a)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
        ax.set_xticklabels(models, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("forward + backward passes")
        ax.set_title(f"Attack cost at {threat}")
        ax.legend(fontsize=7)
        p = _save(fig, fig_dir / f"attack_cost_{safe}.png")
        out.append((p, f"Attack cost (model passes) at {threat}"))
    # explanation maps
    maps = store.rows("explanation_maps", run_id)
    by_model: dict[str, list] = defaultdict(list)
    for m in maps:
        by_model[m["model"]].append(m)
    for model, entries in by_model.items():
        inputs = json.loads(entries[0]["inputs"])
        k = len(inputs)
        if not k:
            continue
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1.6 * (1 + len(entries)), 1.6 * k), dpi=100)
        axes = fig.subplots(k, 1 + len(entries), squeeze=False)
        for i in range(k):
            axes[i][0].imshow(inputs[i], cmap="gray", vmin=0, vmax=1)
            for j, e in enumerate(entries):
                axes[i][j + 1].imshow(json.loads(e["maps"])[i], cmap="inferno")
                if i == 0:
                    axes[i][j + 1].set_title(e["method"], fontsize=8)
            if i == 0:
                axes[i][0].set_title("input", fontsize=8)
        for row in axes:
            for ax in row:
                ax.set_axis_off()
        p = _save(fig, fig_dir / f"explain_{_safe(model)}.png")
        out.append((p, f"Attribution maps of {model}"))
    return out


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)


def write_report(store: Store, run_id: int, out_dir: Path) -> list[Path]:
    """Write the report of ``run_id`` under ``out_dir``: ``leaderboard.{md,csv,html}`` (the
    main table), ``explanations.csv``, ``backdoor.csv``, ``figures/*.png``,
    ``evidence/<model>-<threat>.html`` and ``report.html``
    (:func:`unmask.bench.report_html.write_report`); returns the paths written."""
    from .report_html import write_report as _write

    return _write(store, run_id, Path(out_dir))
