"""The report side of the security curves: the capped curve frame, ``curves.csv`` and the
robust-accuracy-vs-eps figure.

The search itself (a per-sample minimum eps over a grid, run by the suite's ``[curves]``
section) is :mod:`unmask.bench.suite.curves`; its stored ``broken_at`` lists are turned here into
curves that are capped, per sample, by the leaderboard row at each of the suite's eps
(:func:`unmask.bench.report.leaderboard.row_outcomes`). Every point is an **upper bound** on the true
robust accuracy: a sample counts as broken only with an adversarial example in hand.

Usage::

    frame = curves_frame(store, run_id)             # tidy: model, norm, eps, robust_accuracy ...
    write_curves_csv(store, run_id, Path("results/curves.csv"))
    figures = robust_vs_eps_figures(store, run_id, leaderboard, Path("results/figures"))
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from ..core.fileio import atomic_write, safe_name
from ..suite.curves import curve_points
from . import frames
from .plotting import _figure, _save

__all__ = ["curves_frame", "write_curves_csv", "robust_vs_eps_figures", "CURVE_COLUMNS",
           "CSV_COLUMNS", "line_styles"]

CURVE_COLUMNS = ["model", "norm", "eps", "robust_accuracy", "n", "robust", "capped", "suite_eps",
                 "bound"]
# results/curves.csv: the frame's columns a user analyses (``capped``: samples the row's cap
# removed at that eps; ``suite_eps``: one of the suite's own eps, where the curve meets the row).
CSV_COLUMNS = ["model", "threat_norm", "eps", "robust_accuracy", "n", "robust", "suite_eps",
               "capped", "bound"]


def _capped(broken_at: list[float | None],
            row_broken_by: Mapping[float, Sequence[str | None]]) -> list[float | None]:
    """Per sample, the smaller of the search's ``broken_at`` and the smallest suite eps at
    which the row broke the sample (``row_broken_by``: eps -> per-sample ``broken_by`` of the
    row; ``"clean"``, a misclassified clean input, is broken at eps 0)."""
    out = list(broken_at)
    for e in sorted(row_broken_by):
        for i, b in enumerate(row_broken_by[e]):
            at = 0.0 if b == "clean" else e
            if b is not None and (out[i] is None or out[i] > at):
                out[i] = at
    return out


def curves_frame(store, run_id: int) -> pd.DataFrame:
    """The run's security curves as a tidy frame (:data:`CURVE_COLUMNS`): per model, norm and
    eps (0 and every grid eps) the robust accuracy and count of ``n`` samples.

    Capped per sample by the leaderboard row at every suite eps of the norm (the row's worst
    case over the ensemble, the diagnosis and its follow-up): ``capped`` counts the samples the
    cap removed at that eps, ``suite_eps`` marks the suite's own eps (where the curve equals the
    row, or is below it when the search broke a sample the row's attacks did not). ``bound`` is
    ``"upper"``: every point is an upper bound on the true robust accuracy. Models dropped from
    a resumed run are left out. An empty frame when the run has no curves."""

    run = store.run(run_id)
    config = run.config if isinstance(run.config, dict) else {}
    in_run = [m if isinstance(m, str) else (m.get("label") or m["name"])
              for m in config.get("models", [])]
    rows = [r for r in store.rows("curves", run_id) if not in_run or r["model"] in in_run]
    if not rows:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    order = {m: i for i, m in enumerate(in_run)}
    rows.sort(key=lambda r: (r["norm"], order.get(r["model"], len(order)), r["model"]))
    samples: dict[tuple[str, str], dict[float, list[dict[str, Any]]]] = {}
    for s in store.rows("samples", run_id):
        samples.setdefault((s["model"], s["norm"]), {}).setdefault(float(s["eps"]), []).append(s)
    reports = {(m["model"], m["norm"], float(m["eps"])): m for m in store.rows("masking", run_id)}
    out = []
    for r in rows:
        model, norm = r["model"], r["norm"]
        grid = [float(e) for e in json.loads(r["grid"])]
        raw = [None if b is None else float(b) for b in json.loads(r["broken_at"])]
        n = len(raw)
        row_broken: dict[float, tuple[str | None, ...]] = {}
        for e, smp in samples.get((model, norm), {}).items():
            merged, _ = frames.row_outcomes(smp, frames._parse_report(reports.get((model, norm, e))))
            if merged.n == n:
                row_broken[e] = merged.broken_by
        capped = _capped(raw, row_broken)
        before = dict(curve_points(raw, grid))
        for e, robust in curve_points(capped, grid):
            out.append({"model": model, "norm": norm, "eps": e, "robust_accuracy": robust / n,
                        "n": n, "robust": robust, "capped": before[e] - robust,
                        "suite_eps": e in row_broken, "bound": "upper"})
    return pd.DataFrame(out, columns=CURVE_COLUMNS)


def write_curves_csv(store, run_id: int, path: Path) -> Path | None:
    """Write :func:`curves_frame` as CSV (:data:`CSV_COLUMNS`; ``threat_norm`` is the norm) to
    ``path`` atomically; None (and nothing written) when the run has no curves."""

    frame = curves_frame(store, run_id)
    if frame.empty:
        return None
    frame = frame.rename(columns={"norm": "threat_norm"})[CSV_COLUMNS]
    atomic_write(Path(path), frame.to_csv(index=False).encode("utf-8"))
    return Path(path)


_LINESTYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")


def line_styles(count: int) -> list[dict[str, Any]]:
    """``count`` distinct (colour, line style, marker) triples: the ten ``tab10`` colours, then
    the next line style with them, and a marker per model; unique for up to 40 models (then
    the markers still differ within every ten)."""
    # Deferred: matplotlib takes about 1 s to import; only drawing a figure needs it.
    from matplotlib import colormaps

    colours = colormaps["tab10"].colors
    return [{"color": colours[i % 10], "linestyle": _LINESTYLES[(i // 10) % len(_LINESTYLES)],
             "marker": _MARKERS[i % len(_MARKERS)]} for i in range(count)]


def robust_vs_eps_figures(store, run_id: int, df: pd.DataFrame, fig_dir: Path
                          ) -> list[tuple[Path, str]]:
    """One figure per norm: the security curves of the run (upper bounds, capped by the
    cascade at the suite's eps, whose rows are drawn as points with their 95% Wilson interval).

    A model without a curve (not selected by ``[curves] models``, or a run without curves)
    shows only its measured points: the suite's eps with their intervals, never a line from
    eps 0 (nothing was measured in between), labelled "(no curve)" when other models of the
    run have one. ``df`` is the leaderboard frame."""

    out: list[tuple[Path, str]] = []
    frame = curves_frame(store, run_id)
    if "robust_accuracy" in df:
        df = df[df["robust_accuracy"].notna()]
    norms = sorted(set(df["norm"]) if "norm" in df else set() | set(frame["norm"]))
    for norm in norms:
        rows = df[df["norm"] == norm] if "norm" in df else df.iloc[0:0]
        curves = frame[frame["norm"] == norm]
        models = list(dict.fromkeys([*curves["model"], *rows.get("model", [])]))
        if not models:
            continue
        fig = _figure(fig_dir)
        fig.set_size_inches(9, 5)
        ax = fig.add_subplot(1, 1, 1)
        for model, style in zip(models, line_styles(len(models))):
            c = curves[curves["model"] == model].sort_values("eps")
            pts = rows[rows["model"] == model].sort_values("eps")
            label = model if len(c) or curves.empty else f"{model} (no curve)"
            if len(c):
                ax.plot(c["eps"], c["robust_accuracy"], label=label, markersize=4, **style)
                label = None
            if len(pts):
                low = (pts["robust_accuracy"] - pts["ci_low"]).clip(lower=0)
                high = (pts["ci_high"] - pts["robust_accuracy"]).clip(lower=0)
                ax.errorbar(pts["eps"], pts["robust_accuracy"], yerr=[low, high],
                            color=style["color"], marker=style["marker"], linestyle="none",
                            markeredgecolor="black", markersize=7, capsize=3, label=label)
        ax.set_xlabel(f"eps ({norm})")
        ax.set_ylabel("robust accuracy (upper bound)")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
        what = ("lines: per-sample minimum-eps search, capped by the suite's row" if len(curves)
                else "no curves in this run: the suite's eps only")
        ax.set_title(f"Security curves ({norm}); {what}; black-edged points: the rows with "
                     "95% CI", fontsize=8)
        # beside the axes: with a dozen models a legend inside hides the curves
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
        p = _save(fig, fig_dir / f"robust_vs_eps_{safe_name(norm)}.png")
        out.append((p, f"Security curves ({norm}): robust accuracy against eps, an upper bound "
                       "(per-sample minimum-eps search, capped by the cascade at the suite's "
                       "eps); points: the leaderboard rows with their 95% Wilson intervals"))
    return out
