"""The tables a reader sees: the main leaderboard (at most ten columns), the models that are
not ranked, the explanation metrics and the backdoor results, each as a tidy DataFrame
(numbers as numbers, for CSV and pandas) and as a :class:`Table` of display cells that the
Markdown and HTML renderers share, so both show the same columns.

The main table follows RobustBench's reading order: rank, model, defense, clean accuracy,
robust accuracy with its 95% Wilson interval, the masking verdict with a few words of reason,
the certified lower bound when the run computed one, n and the cost. Everything else of a
row (each attack of the cascade, every masking check, who broke which samples, the
checkpoint fingerprint) is on the row's evidence page (:mod:`unmask.bench.report.html`).

Ranks: rows whose robust numbers are equal share a rank (competition ranking: 1, 2, 4, 4);
a rank whose 95% interval overlaps the interval of the rank above is marked
:data:`OVERLAP_MARK`, since the order of the two is then not significant.

Usage::

    df = leaderboard_frame(store, run_id)
    main = main_frame(df, defenses=defense_texts(store, run_id))   # CSV: main.to_csv()
    expl = explanations_frame(store, run_id)                       # one row per model, method
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ...explain.attribution import METHODS
from ...explain.metrics import score_infos
from .. import zoo
from ..core.fileio import safe_name
from ..core.training import RECIPES
from ..suite.store import Store

__all__ = ["Cell", "Table", "MetricInfo", "EXPLAIN_METRICS", "BACKDOOR_METRICS", "OVERLAP_MARK",
           "RANDOMISED_MARK", "main_frame", "main_tables", "explanations_frame",
           "explanations_table", "backdoor_frame", "table_draws", "backdoor_table", "backdoor_tables",
           "defense_texts",
           "evidence_name", "markdown", "marker_legend", "certified_legend", "explanation_legend",
           "backdoor_legend", "MAIN_CSV_COLUMNS"]

OVERLAP_MARK = "≈"
RANDOMISED_MARK = "†"


@dataclass(frozen=True)
class Cell:
    """One display cell: its ``text``, the value a column sort uses (``sort``; the text when
    None), a link target (``href``) and a tooltip (``title``)."""

    text: str
    sort: float | str | None = None
    href: str | None = None
    title: str | None = None


@dataclass
class Table:
    """A display table: ``columns`` (header texts), ``rows`` of :class:`Cell`, one CSS class
    per row (``classes``: the verdict, ``error``), an ``id`` for HTML, and a ``legend``."""

    id: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)
    classes: list[str] = field(default_factory=list)
    caption: str = ""
    legend: list[str] = field(default_factory=list)

    def drop_empty(self) -> Table:
        """The table without the columns whose every cell is empty."""
        keep = [i for i in range(len(self.columns))
                if any(r[i].text.strip() for r in self.rows)]
        return Table(self.id, [self.columns[i] for i in keep],
                     [[r[i] for i in keep] for r in self.rows], list(self.classes),
                     self.caption, list(self.legend))


@dataclass(frozen=True)
class MetricInfo:
    """What a metric column means: short ``label``, ``better`` ("higher" or "lower"),
    ``range`` in words and a one-line ``meaning`` with its reference."""

    label: str
    better: str
    range: str
    meaning: str

    @property
    def header(self) -> str:
        """The column header: the label with an arrow pointing the better way."""
        return f"{self.label} {'↑' if self.better == 'higher' else '↓'}"


# The explanation metrics' stored numbers in display order, from the metric registry.
EXPLAIN_METRICS: dict[str, MetricInfo] = {
    key: MetricInfo(info.label, info.better, info.range_text, info.meaning)
    for key, info in score_infos().items()}


def _method_title(method: str) -> str:
    """A stored method's display title (the method registry's; a stored name no longer
    registered shows as itself)."""
    return METHODS.get(method).title if method in METHODS else method


# Backdoor metrics in display order; for the model's owner a lower success rate is better,
# for a detector a higher AUROC.
BACKDOOR_METRICS: dict[str, MetricInfo] = {
    "poison_rate": MetricInfo("poison rate", "lower", "[0, 1]",
                              "share of the training set the attacker poisoned"),
    "clean_accuracy": MetricInfo("clean acc.", "higher", "[0, 1]",
                                 "accuracy on clean test inputs"),
    "reference_accuracy": MetricInfo("reference acc.", "higher", "[0, 1]",
                                     "clean accuracy of the same model trained without poison"),
    "clean_accuracy_cost": MetricInfo("clean-acc. cost", "lower", "[-1, 1]",
                                      "reference accuracy minus clean accuracy"),
    "attack_success_rate": MetricInfo("ASR", "lower", "[0, 1]",
                                      "share of triggered non-target inputs classified as the "
                                      "target"),
    "spectral_auroc": MetricInfo("spectral AUROC", "higher", "[0, 1], 0.5 = chance",
                                 "spectral-signature poison detection (Tran et al. 2018)"),
    "spectral_precision": MetricInfo("spectral precision", "higher", "[0, 1]",
                                     "share of flagged training samples that are poisoned"),
    "spectral_recall": MetricInfo("spectral recall", "higher", "[0, 1]",
                                  "share of poisoned training samples flagged"),
    "clustering_auroc": MetricInfo("clustering AUROC", "higher", "[0, 1], 0.5 = chance",
                                   "activation-clustering poison detection (Chen et al. 2019)"),
    "clustering_precision": MetricInfo("clustering precision", "higher", "[0, 1]",
                                       "share of flagged training samples that are poisoned"),
    "clustering_recall": MetricInfo("clustering recall", "higher", "[0, 1]",
                                    "share of poisoned training samples flagged"),
    "strip_frr": MetricInfo("STRIP FRR", "lower", "[0, 1]",
                            "clean inputs STRIP rejects (Gao et al. 2019)"),
    "strip_far": MetricInfo("STRIP FAR", "lower", "[0, 1]",
                            "triggered inputs STRIP lets through"),
    "fine_pruning_prune_ratio": MetricInfo("fine-pruning ratio", "lower", "[0, 1]",
                                           "share of last-layer channels pruned (Liu et al. "
                                           "2018)"),
    "fine_pruning_clean_accuracy": MetricInfo("clean acc. after fine-pruning", "higher",
                                              "[0, 1]", "clean accuracy after fine-pruning"),
    "fine_pruning_attack_success_rate": MetricInfo("ASR after fine-pruning", "lower", "[0, 1]",
                                                   "attack success rate after fine-pruning"),
}
_BACKDOOR_COUNTS = {"poisoned": "poisoned samples", "spectral_flagged": "spectral flagged",
                    "clustering_flagged": "clustering flagged"}

# The columns of the main table's CSV, in order: the Markdown/HTML columns with the compound
# cells split into numbers (robust accuracy and its interval, passes and seconds).
MAIN_CSV_COLUMNS = ["rank", "overlaps_above", "model", "threat", "defense", "clean_accuracy",
                    "robust_accuracy", "ci_low", "ci_high", "verdict", "reason", "certified",
                    "certified_gap", "certified_exact", "certified_note", "n",
                    "passes_per_sample", "seconds", "evidence"]


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    try:
        if pd.isna(v):
            return ""
    except (TypeError, ValueError):
        pass
    return f"{float(v):.{digits}f}"


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def evidence_name(model: str, threat: str) -> str:
    """The file name of a row's evidence page: ``<model>-<norm>_<eps>.html``."""
    return f"{safe_name(model)}-{safe_name(threat)}.html"


# --- defenses ---------------------------------------------------------------------------------


def _defense_of_entry(entry) -> tuple[str, str]:
    opts = dict(entry.recipe_options)
    desc = entry.description or ""
    if entry.recipe == "none":
        # "mnist-cnn behind JPEG compression at quality 25 (masking control: ...)." -> the
        # wrapper in a few words
        text = desc.split(" (")[0].rstrip(".")
        if entry.base and text.startswith(entry.base):
            text = text[len(entry.base):].strip()
            for word in ("behind ", "with ", "returning "):
                if text.startswith(word):
                    text = text[len(word):]
                    break
        short = text or "none"
        if "masking-control" in entry.tags:
            short = f"control: {short}"
        return short, desc
    label = RECIPES.get(entry.recipe).label if entry.recipe in RECIPES else entry.recipe
    if entry.recipe == "backdoor":
        trigger = opts.get("trigger", "")
        rate = opts.get("poison_rate")
        short = f"{trigger} backdoor" + (f" ({rate:.0%} poison)" if rate is not None else "")
        return short.strip(), desc
    extra = []
    if entry.recipe == "trades" and "beta" in opts:
        extra.append(f"β {opts['beta']:g}")
    if entry.recipe == "grad-reg" and "lam" in opts:
        extra.append(f"λ {opts['lam']:g}")
    if "eps" in opts:
        extra.append(f"{opts.get('norm', '')} {opts['eps']:g}".strip())
    return (f"{label} ({', '.join(extra)})" if extra else label), desc


def defense_texts(store: Store, run_id: int) -> dict[str, tuple[str, str]]:
    """``{row model: (short defense text, full description)}`` for the run's models: the zoo
    entry's recipe in a few words (e.g. ``TRADES (β 6, linf 0.3)``, ``control: JPEG
    compression at quality 25``); ``("user model", ...)`` for a model from a user module."""

    config = store.run(run_id).config
    models = config.get("models", []) if isinstance(config, dict) else []
    known = set(zoo.list())
    out: dict[str, tuple[str, str]] = {}
    for m in models:
        key = m.get("label") or m["name"]
        if m["name"] in known:
            out[key] = _defense_of_entry(zoo.get(m["name"]))
        else:
            out[key] = ("user model", f"{m['name']} (not a zoo entry)")
    return out


# --- main table -------------------------------------------------------------------------------


def _verdict_and_reason(row: dict[str, Any]) -> tuple[str, str]:
    """(verdict word, a few words of reason)."""
    status = str(row.get("status") or "ok")
    if status != "ok":
        return "error", status.removeprefix("error: ")
    masking = str(row.get("masking") or "")
    if masking.startswith("error"):
        return "error", "diagnosis failed: " + masking.removeprefix("error: ")
    if masking in ("", "not run"):
        return "not diagnosed", ""
    if masking not in ("clean", "suspicious", "masked"):  # unavailable: <reason>
        return masking.split(":")[0], masking.partition(":")[2].strip()
    failing = [f.strip() for f in str(row.get("failing_checks") or "").split(",") if f.strip()]
    reason = ""
    if failing:
        reason = failing[0] + (f" +{len(failing) - 1}" if len(failing) > 1 else "")
    if masking == "masked" and bool(row.get("adaptive")):
        return "masked", (f"{reason}; " if reason else "") + "adaptive re-checks pass"
    return masking, reason


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def main_frame(df: pd.DataFrame, *, defenses: dict[str, tuple[str, str]] | None = None,
               evidence_dir: str | None = "evidence") -> pd.DataFrame:
    """The main table of a :func:`~unmask.bench.report.leaderboard.leaderboard_frame`, tidy: the
    columns :data:`MAIN_CSV_COLUMNS` (``certified`` and ``certified_exact`` only when the
    frame has a certified bound), numbers as numbers. ``overlaps_above``: this rank's 95%
    interval overlaps the interval of the rank above. ``passes_per_sample``: the attack
    ensemble's forward plus backward passes per sample; ``seconds``: wall time of the row's
    attacks and masking diagnosis. ``evidence``: the evidence page's path relative to the
    report (None with ``evidence_dir=None``)."""
    defenses = defenses or {}
    has_cert = "certified" in df.columns and df["certified"].notna().any()
    rows = []
    for r in df.to_dict("records"):
        verdict, why = _verdict_and_reason(r)
        rank = None if _missing(r.get("rank")) else int(r["rank"])
        note = "" if rank is not None else str(r.get("rank_note") or "")
        if verdict == "error":
            reason = note or why
        else:
            reason = why if rank is not None else "; ".join(x for x in (note, why) if x)
        n = None if _missing(r.get("n")) else int(r["n"])
        passes = None
        if n and not _missing(r.get("forwards")):
            passes = (float(r["forwards"]) + float(r.get("backwards") or 0)) / n
        out = {
            "rank": rank, "overlaps_above": False, "model": r["model"],
            "threat": r["threat"], "defense": defenses.get(r["model"], ("", ""))[0],
            "clean_accuracy": r.get("clean_accuracy"), "robust_accuracy": r.get("robust_accuracy"),
            "ci_low": r.get("ci_low"), "ci_high": r.get("ci_high"), "verdict": verdict,
            "reason": reason,
        }
        if has_cert:
            out["certified"] = r.get("certified")
            out["certified_gap"] = None if _missing(r.get("gap")) else float(r["gap"])
            exact = r.get("exact")
            out["certified_exact"] = None if _missing(exact) else bool(exact)
            note = r.get("certified_note")
            out["certified_note"] = note if isinstance(note, str) and note else None
        out.update({"n": n, "passes_per_sample": passes,
                    "seconds": None if _missing(r.get("runtime_s")) else float(r["runtime_s"]),
                    "evidence": (None if evidence_dir is None else
                                 f"{evidence_dir}/{evidence_name(r['model'], r['threat'])}")})
        rows.append(out)
    cols = [c for c in MAIN_CSV_COLUMNS if has_cert or not c.startswith("certified")]
    main = pd.DataFrame(rows, columns=cols)
    if main.empty:
        return main
    main["rank"] = pd.array(main["rank"], dtype="Int64")
    # the overlap mark: per threat, each rank against the rank just above it
    for _, group in main.groupby("threat", sort=False):
        ranked = group[group["rank"].notna()]
        intervals: dict[int, list[tuple[float, float]]] = {}
        for rk, lo, hi in zip(ranked["rank"], ranked["ci_low"], ranked["ci_high"]):
            intervals.setdefault(int(rk), []).append((float(lo), float(hi)))
        ranks = sorted(intervals)
        for idx, lo, hi, rk in zip(ranked.index, ranked["ci_low"], ranked["ci_high"],
                                   ranked["rank"]):
            above = [r for r in ranks if r < int(rk)]
            if above:
                main.loc[idx, "overlaps_above"] = any(
                    _overlap((float(lo), float(hi)), iv) for iv in intervals[above[-1]])
    return main


def certified_legend(df: pd.DataFrame) -> str | None:
    """What the certified column says, with each reason a row has no bound (``n/a``) and the
    models it applies to; None when the frame has no certified column."""
    if "certified" not in df.columns or not df["certified"].notna().any():
        return None
    text = ("Certified: a proven lower bound of the robust accuracy on the same samples (the "
            "best of IBP, CROWN and the exact MILP; docs/certified.md), with its method; exact: "
            "it equals the attack's number, so the robust accuracy is exact; gap: the robust "
            "accuracy minus the bound, the most a stronger attack could still take off.")
    notes: dict[str, list[str]] = {}
    for model, value, note in zip(df["model"], df["certified"],
                                  df.get("certified_note", pd.Series([None] * len(df)))):
        if _missing(value) and isinstance(note, str) and note:
            notes.setdefault(note, [])
            if model not in notes[note]:
                notes[note].append(model)
    for note, models in notes.items():
        text += f" n/a: {note} ({', '.join(models)})."
    return text


def marker_legend(draws: int | None = None, certified: str | None = None) -> str:
    """What the rank and robust-accuracy markers and the cost column mean; ``draws``: the
    draws of a randomised model in the table (its marker is explained only then);
    ``certified``: :func:`certified_legend`'s text, when the table has the column."""
    text = (f"Rank: equal robust accuracies share a rank; {OVERLAP_MARK}: this rank's 95% "
            "interval overlaps the interval of the rank above, so their order is not "
            "significant. Cost: the attack ensemble's forward + backward passes per sample, "
            "and the wall seconds of the row's attacks and masking diagnosis.")
    if draws is not None:
        text += (f" {RANDOMISED_MARK}: randomised model, robust on a majority of {int(draws)} "
                 "draws: a sample counts as robust when it is classified correctly on a "
                 f"strict majority of {int(draws)} fresh draws.")
    if certified:
        text += " " + certified
    return text


def table_draws(df: pd.DataFrame) -> int | None:
    """The draws of the randomised rows of a leaderboard frame (None without one)."""
    if "draws" not in df:
        return None
    values = [int(v) for v in df["draws"] if not _missing(v)]
    return max(values) if values else None


def _cost_cell(passes: Any, seconds: Any) -> Cell:
    if _missing(passes) and _missing(seconds):
        return Cell("")
    parts = []
    if not _missing(passes):
        parts.append(f"{passes:,.0f} passes")
    if not _missing(seconds):
        parts.append(f"{seconds:.1f} s")
    return Cell(" · ".join(parts), sort=None if _missing(passes) else float(passes),
                title="forward + backward passes per sample; wall seconds of attacks and "
                      "diagnosis")


def _robust_cell(r: dict[str, Any], draws: Any) -> Cell:
    if _missing(r.get("robust_accuracy")):
        return Cell("", sort=-1.0)
    text = f"{r['robust_accuracy']:.3f} [{r['ci_low']:.3f}, {r['ci_high']:.3f}]"
    title = "worst case per sample over every attack; 95% Wilson interval"
    if not _missing(draws):
        text += f" {RANDOMISED_MARK}"
        title += f"; randomised: robust on a majority of {int(draws)} draws"
    return Cell(text, sort=float(r["robust_accuracy"]), title=title)


def _certified_cell(value: Any, exact: Any, gap: Any = None, note: Any = None,
                    method: Any = None) -> Cell:
    """The proven lower bound, ``(exact)`` where it meets the attack's number, else the gap;
    ``n/a`` with the reason (e.g. ``not supported: MaxPool2d``) where no bound applies."""
    if _missing(value):
        if isinstance(note, str) and note:
            return Cell("n/a", sort=-1.0, title=note)
        return Cell("")
    how = f"{method}, " if isinstance(method, str) and method else ""
    if not _missing(exact) and bool(exact):
        text = f"{float(value):.3f} ({how}exact)"
    elif not _missing(gap):
        text = f"{float(value):.3f} ({how}gap {float(gap):.2f})"
    else:
        text = f"{float(value):.3f}" + (f" ({method})" if how else "")
    return Cell(text, sort=float(value),
                title="proven lower bound on the robust accuracy" +
                      ("; exact: equals the attack's number" if text.endswith("exact)") else
                       "; gap: robust accuracy minus this bound, the most a stronger attack "
                       "could still lower the number"))


def main_tables(df: pd.DataFrame, *, defenses: dict[str, tuple[str, str]] | None = None,
                evidence_dir: str | None = "evidence") -> list[tuple[str, Table, Table]]:
    """Per threat: ``(threat, ranked, not_ranked)`` display tables of the leaderboard frame
    ``df``. The ranked table has at most ten columns (rank, model, defense, clean, robust
    [95% CI], verdict, certified when present, n, cost); the models that are not ranked
    (masked, not diagnosed, failed) are listed apart with the reason. Empty columns are
    dropped."""
    defenses = defenses or {}
    main = main_frame(df, defenses=defenses, evidence_dir=evidence_dir)
    if main.empty:
        return []
    source = df.set_index(["model", "threat"])
    has_cert = "certified" in main.columns
    out = []
    for threat, group in main.groupby("threat", sort=False):
        cert_col = ["certified"] if has_cert else []
        ranked = Table(f"leaderboard-{safe_name(threat)}",
                       ["rank", "model", "defense", "clean", "robust [95% CI]", "verdict",
                        *cert_col, "n", "cost"], caption=f"Ranked at {threat}")
        apart = Table(f"not-ranked-{safe_name(threat)}",
                      ["model", "defense", "clean", "robust [95% CI]", "verdict",
                       "not ranked because", *cert_col, "n", "cost"],
                      caption=f"Not ranked at {threat}")
        for r in group.to_dict("records"):
            frame_row = source.loc[(r["model"], threat)]
            if isinstance(frame_row, pd.DataFrame):
                frame_row = frame_row.iloc[0]
            frame_row = frame_row.to_dict()
            model = Cell(r["model"], href=r["evidence"],
                         title="evidence: masking checks, attack cascade, provenance"
                         if r["evidence"] else None)
            defense = Cell(r["defense"], title=defenses.get(r["model"], ("", ""))[1] or None)
            verdict, why = _verdict_and_reason(frame_row)
            verdict_text = verdict + (f": {why}" if why and verdict != "error" else "")
            cells_common = [Cell(_num(r["clean_accuracy"]),
                                 sort=-1.0 if _missing(r["clean_accuracy"])
                                 else float(r["clean_accuracy"])),
                            _robust_cell({**frame_row, **r}, frame_row.get("draws"))]
            cert = ([_certified_cell(r.get("certified"), r.get("certified_exact"),
                                     r.get("certified_gap"), r.get("certified_note"),
                                     frame_row.get("certified_method"))]
                    if has_cert else [])
            tail = [Cell("" if r["n"] is None else str(r["n"]), sort=r["n"]),
                    _cost_cell(r["passes_per_sample"], r["seconds"])]
            cls = r["verdict"].split(" ")[0] if r["verdict"] in (
                "clean", "suspicious", "masked", "error") else "other"
            if not _missing(r["rank"]):
                rank_text = str(int(r["rank"])) + (f" {OVERLAP_MARK}" if r["overlaps_above"]
                                                   else "")
                ranked.rows.append([Cell(rank_text, sort=int(r["rank"])), model, defense,
                                    *cells_common, Cell(verdict_text), *cert, *tail])
                ranked.classes.append(cls)
            else:
                note = str(frame_row.get("rank_note") or "")
                apart.rows.append([model, defense, *cells_common, Cell(verdict_text),
                                   Cell(note), *cert, *tail])
                apart.classes.append(cls)
        out.append((threat, ranked.drop_empty() if ranked.rows else ranked,
                    apart.drop_empty() if apart.rows else apart))
    return out


# --- explanations -----------------------------------------------------------------------------


def explanations_frame(store: Store, run_id: int) -> pd.DataFrame:
    """One row per model and attribution method, one column per explanation metric (the
    store's metric names, see :data:`EXPLAIN_METRICS` for direction and range) and ``n``,
    the number of samples scored. Models dropped from a resumed run are left out."""
    config = store.run(run_id).config
    order = [m.get("label") or m["name"] for m in (config.get("models", [])
                                                    if isinstance(config, dict) else [])]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    metrics: list[str] = []
    for e in store.rows("explanations", run_id):
        if order and e["model"] not in order:
            continue
        row = rows.setdefault((e["model"], e["method"]),
                              {"model": e["model"], "method": e["method"], "n": e["n"]})
        row[e["metric"]] = e["value"]
        row["n"] = max(int(row["n"]), int(e["n"]))
        if e["metric"] not in metrics:
            metrics.append(e["metric"])
    known = [m for m in EXPLAIN_METRICS if m in metrics]
    cols = ["model", "method", *known, *[m for m in metrics if m not in known], "n"]
    df = pd.DataFrame(list(rows.values()), columns=cols)
    if df.empty:
        return df
    rank = {m: i for i, m in enumerate(order)}
    df["_o"] = df["model"].map(rank).fillna(len(rank))
    return df.sort_values(["_o", "method"], kind="mergesort").drop(columns="_o"
                                                                    ).reset_index(drop=True)


def explanation_legend(columns: list[str]) -> list[str]:
    """One line per metric column: label, direction, range, meaning."""
    out = _metric_lines(columns, EXPLAIN_METRICS)
    out += [f"{c}: the store's metric, direction not stated." for c in columns
            if c not in EXPLAIN_METRICS and c not in ("model", "method", "n")]
    return out


def _metric_lines(columns: list[str], metrics: dict[str, Any]) -> list[str]:
    """``header: direction is better; range R. Meaning.`` for each column with an entry in
    ``metrics`` (in column order)."""
    return [f"{m.header}: {m.better} is better; range {m.range}. "
            f"{m.meaning[:1].upper()}{m.meaning[1:]}." for m in
            (metrics[c] for c in columns if c in metrics)]


def explanations_table(frame: pd.DataFrame, *, evidence: dict[str, str] | None = None
                       ) -> Table:
    """The display table of :func:`explanations_frame`; ``evidence`` maps a model to its
    evidence page (the first threat's)."""
    metrics = [c for c in frame.columns if c not in ("model", "method", "n")]
    headers = ["model", "method", *[EXPLAIN_METRICS[m].header if m in EXPLAIN_METRICS else m
                                    for m in metrics], "n"]
    shown = [m for m in metrics if frame[m].notna().any()]
    t = Table("explanations", headers, caption="Explanation metrics",
              legend=explanation_legend(shown))
    for r in frame.to_dict("records"):
        t.rows.append([Cell(r["model"], href=(evidence or {}).get(r["model"])),
                       Cell(_method_title(r["method"]))]
                      + [Cell(_num(r[m]), sort=None if _missing(r[m]) else float(r[m]))
                         for m in metrics] + [Cell(str(r["n"]), sort=int(r["n"]))])
        t.classes.append("")
    return t.drop_empty() if t.rows else t


# --- backdoor ---------------------------------------------------------------------------------


def backdoor_frame(store: Store, run_id: int, *, defenses: dict[str, tuple[str, str]] | None
                   = None) -> pd.DataFrame:
    """One row per backdoored model: ``model``, ``backdoor`` (the trigger in words),
    ``target`` and every stored metric (:data:`BACKDOOR_METRICS` order first)."""
    rows: dict[str, dict[str, Any]] = {}
    metrics: list[str] = []
    for b in store.rows("backdoor", run_id):
        rows.setdefault(b["model"], {"model": b["model"]})[b["metric"]] = b["value"]
        if b["metric"] not in metrics:
            metrics.append(b["metric"])
    for model, row in rows.items():
        text = (defenses or {}).get(model, ("", ""))[0]
        row["backdoor"] = text if "backdoor" in text else ""  # a zoo backdoor recipe only
        if not _missing(row.get("target")):
            row["target"] = int(row["target"])
    known = [m for m in BACKDOOR_METRICS if m in metrics]
    rest = [m for m in metrics if m not in known and m != "target"]
    cols = ["model", "backdoor", "target", *known, *rest]
    return pd.DataFrame(list(rows.values()), columns=cols)


def backdoor_legend(columns: list[str]) -> list[str]:
    """One line per backdoor metric column: label, direction (for the model's owner or the
    defender), range, meaning."""
    out = _metric_lines(columns, BACKDOOR_METRICS)
    if "target" in columns:
        out.append("target: the class the trigger flips inputs to.")
    for c in columns:
        if c in _BACKDOOR_COUNTS:
            out.append(f"{_BACKDOOR_COUNTS[c]}: a count of training samples.")
    return out


_DEFENSE_PREFIXES = ("spectral_", "clustering_", "strip_", "fine_pruning_")


def backdoor_table(frame: pd.DataFrame, *, evidence: dict[str, str] | None = None,
                   part: str = "attack") -> Table:
    """The display table of :func:`backdoor_frame`: ``part="attack"`` the backdoor itself
    (trigger, target, poison rate, clean accuracy and its cost, attack success rate),
    ``part="defenses"`` the detection scores, STRIP and fine-pruning (two tables, so that a
    run with every defense still fits a 1280-pixel window)."""
    if part not in ("attack", "defenses"):
        raise ValueError(f"unknown backdoor table part {part!r}; expected attack or defenses")
    keys = [c for c in frame.columns if c not in ("model", "backdoor", "target")]
    is_defense = [k.startswith(_DEFENSE_PREFIXES) for k in keys]
    metrics = [k for k, d in zip(keys, is_defense) if d == (part == "defenses")]
    lead = ["model"] + (["backdoor", "target"] if part == "attack" else [])
    headers = [*lead, *[BACKDOOR_METRICS[m].header if m in BACKDOOR_METRICS
                        else _BACKDOOR_COUNTS.get(m, m) for m in metrics]]
    t = Table("backdoor" if part == "attack" else "backdoor-defenses", headers,
              caption="Backdoor results" if part == "attack" else "Backdoor defenses",
              legend=backdoor_legend(lead + [m for m in metrics if frame[m].notna().any()]))
    for r in frame.to_dict("records"):
        cells = [Cell(r["model"], href=(evidence or {}).get(r["model"]))]
        if part == "attack":
            cells += [Cell(str(r.get("backdoor") or "")),
                      Cell("" if _missing(r.get("target")) else str(int(r["target"])))]
        for m in metrics:
            v = r.get(m)
            if m in _BACKDOOR_COUNTS:
                cells.append(Cell("" if _missing(v) else str(int(v)),
                                  sort=None if _missing(v) else int(v)))
            else:
                cells.append(Cell(_num(v), sort=None if _missing(v) else float(v)))
        t.rows.append(cells)
        t.classes.append("")
    return t.drop_empty() if t.rows else t


def backdoor_tables(frame: pd.DataFrame, *, evidence: dict[str, str] | None = None
                    ) -> list[Table]:
    """The backdoor tables with something in them: the attack's, then the defenses'."""
    out = []
    for part in ("attack", "defenses"):
        t = backdoor_table(frame, evidence=evidence, part=part)
        if t.rows and len(t.columns) > 1:
            out.append(t)
    return out


# --- Markdown ---------------------------------------------------------------------------------


def markdown(table: Table, *, links: bool = True) -> str:
    """A Markdown table of ``table`` (links as ``[text](href)`` when ``links``)."""
    if not table.rows:
        return "(none)"

    def esc(v: str) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    def cell(c: Cell) -> str:
        if links and c.href and c.text:
            return f"[{esc(c.text)}]({c.href})"
        return esc(c.text)

    lines = ["| " + " | ".join(esc(c) for c in table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines)


def details_json(text: str) -> str:
    """Pretty JSON of a stored report (the text itself when it is not JSON)."""
    try:
        return json.dumps(json.loads(text), indent=2)
    except (TypeError, json.JSONDecodeError):
        return str(text)
